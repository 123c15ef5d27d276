"""What an optimiser step does once the step's gradients are summed: clip, schedule, update.

:class:`ParameterUpdate` owns the optimiser and the learning-rate schedule of a run's trainable
parameters. The trainer calls :meth:`ParameterUpdate.apply` once per step; a non-finite gradient
norm is reported before anything is changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.training import checkpoint as ckpt
from peftkit.training.optim import LRSchedule, build_optimizer


class NonFiniteGradientError(ArithmeticError):
    """The gradient norm is NaN/inf; nothing was updated."""

    def __init__(self, norm: float) -> None:
        super().__init__(f"the gradient norm became {norm}")
        self.norm = norm


class ParameterUpdate:
    """The optimiser and schedule over ``params`` (every trainable tensor of the model).

    Args:
        params: ``(name, parameter)`` pairs, in a fixed order (checkpoints key by name).
        config: the run's :class:`~peftkit.training.config.TrainingConfig`.
        total_steps: optimiser steps of the run (the schedule's length).
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], config: Any, total_steps: int) -> None:
        self.params = list(params)
        self.max_grad_norm = config.max_grad_norm
        self.optimizer = build_optimizer(config.optimizer, [p for _, p in self.params], config)
        warmup = config.warmup_steps or round((config.warmup_ratio or 0.0) * total_steps)
        self.schedule = LRSchedule(config.lr, total_steps, warmup, config.scheduler, config.min_lr_ratio)

    def gradient_norm(self) -> float:
        grads = [p.grad for _, p in self.params if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def apply(self, step: int, model: Any) -> tuple[float, float]:
        """Clip (if configured), set the learning rate of ``step`` (from 0), step the optimiser, run the
        model's ``after_optimizer_step`` hook (AdaLoRA reads the gradients there), zero the gradients.

        Returns ``(learning rate, gradient norm before clipping)``.
        """
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.max_grad_norm))
        else:
            norm = self.gradient_norm()
        if not math.isfinite(norm):
            raise NonFiniteGradientError(norm)
        lr = self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        model.after_optimizer_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        return lr, norm

    # ------------------------------------------------------------------ checkpoints
    def schedule_state(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON-able state and tensors for a checkpoint."""
        meta, tensors = ckpt.optimizer_state(self.optimizer)
        tensors.update(ckpt.trainable_tensors(self.params))
        return {"optimizer": meta, "schedule": self.schedule.state_dict()}, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore the parameters and the optimiser (onto the parameters' device, whatever wrote them)."""
        ckpt.load_trainable_tensors(self.params, tensors)
        ckpt.load_optimizer_state(self.optimizer, meta["optimizer"], tensors)
