"""Optimisers by name, and the learning-rate schedule as a pure function of the step.

The schedule has no hidden state: the learning rate of step ``s`` (counting from 0) is
``lr · factor(s)``, with a linear warmup to 1 over ``warmup`` steps, then (``linear``) a straight
line or (``cosine``) half a cosine down to ``min_lr_ratio`` at ``total`` steps, or (``constant``)
a flat line. A resumed run recomputes it from the step counter alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(name: str, params: Iterable[nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """``adamw`` / ``adam`` / ``sgd`` over ``params`` with the config's lr, betas, eps, decay, momentum."""
    params = list(params)
    adam = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(name)
    if adam is not None:
        betas = (config.adam_beta1, config.adam_beta2)
        return adam(params, lr=config.lr, betas=betas, eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


@dataclass
class LRSchedule:
    """Learning rate per step. ``state_dict()`` records its shape so a checkpoint is self-describing."""

    lr: float
    total: int
    warmup: int = 0
    kind: str = "linear"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"scheduler must be constant, linear or cosine, got {self.kind!r}")

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's learning rate for ``step``; return it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
