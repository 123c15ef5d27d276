"""peftkit's CPU defaults reach OpenMP: idle threads sleep instead of spinning (docs/performance.md).

libgomp prints its settings at load with ``OMP_DISPLAY_ENV=VERBOSE``; ``GOMP_SPINCOUNT`` is how long
an idle thread spins: 0 under ``OMP_WAIT_POLICY=PASSIVE``, 300,000 by default.
"""

import os
import subprocess
import sys

import pytest


def spincount(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environ.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    return next(line.split("=")[1].strip(" '") for line in out.stderr.splitlines() if "GOMP_SPINCOUNT" in line)


@pytest.mark.slow
def test_importing_peftkit_first_makes_idle_threads_sleep():
    assert spincount("import peftkit") == "0"
    assert spincount("import peftkit.cli.main") == "0"  # the `peftkit` command


@pytest.mark.slow
def test_an_explicit_setting_wins():
    assert spincount("import peftkit", OMP_WAIT_POLICY="ACTIVE") != "0"
    assert spincount("import torch, peftkit") != "0"  # torch first: too late (documented)
