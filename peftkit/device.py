"""Where the model runs: the ``device`` setting of ``train``, ``eval``, ``demo`` and the Python API.

``auto`` picks the GPU when there is one (under ``torchrun``, the process's own: ``cuda:LOCAL_RANK``)
and the CPU otherwise; ``cpu``; ``cuda`` (under ``torchrun``: the process's own GPU); ``cuda:N``.
Asking for a GPU that is not there is an error that says what is visible, never a silent fallback.
"""

from __future__ import annotations

import re

import torch

DEVICE_SETTINGS = "auto | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_setting(setting: str) -> str:
    """``setting`` if it is one of :data:`DEVICE_SETTINGS`, else a ``ValueError`` naming them."""
    if not isinstance(setting, str) or not _PATTERN.match(setting):
        raise ValueError(f"device must be one of {DEVICE_SETTINGS}, got {setting!r}")
    return setting


def resolve_device(setting: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for ``setting`` (see the module docstring)."""
    if isinstance(setting, torch.device):
        setting = str(setting)
    setting = check_device_setting(setting)
    available = torch.cuda.is_available()
    if setting == "auto":
        return torch.device("cuda", local_rank) if available else torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not available:
        raise ValueError(f"device={setting!r}, but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    index = int(setting.split(":")[1]) if ":" in setting else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={setting!r}, but only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")
