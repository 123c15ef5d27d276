"""Process-wide CPU settings peftkit chooses before torch loads (this module must not import torch).

On a shared machine, torch's idle OpenMP threads *spin* between operations by default (libgomp
busy-waits up to ~300,000 iterations before sleeping). When another process holds one of the
cores, the spinning thread and the thread doing the work fight for it, and every small operation
waits for a descheduled peer: measured on a 2-core machine with one core busy, demo training fell
from ~240 to ~10 tokens/s. With ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep, and the same run
loses about what the lost core was worth (``scripts/busy_machine.py``, ``docs/performance.md``).

libgomp reads the variable once, when it loads, that is at ``import torch``. peftkit sets it with
``os.environ.setdefault`` when ``peftkit`` is imported, so an explicit ``OMP_WAIT_POLICY`` always
wins, and a program that imported torch *before* peftkit keeps torch's default (set the variable
in the shell then). The thread count is left to torch (one per core).
"""

from __future__ import annotations

import os

CPU_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_cpu_defaults() -> None:
    """Set :data:`CPU_DEFAULTS` in the environment where the user has not set them."""
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value)


apply_cpu_defaults()
