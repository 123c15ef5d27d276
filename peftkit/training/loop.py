"""``fit``: train a model on a stream of ready-made batches, through the one training loop.

A convenience for notebooks and the demo: no config file, no data pipeline, nothing written to
disk. It builds a :class:`~peftkit.training.trainer.Trainer` (AdamW, linear warmup then linear
decay, clipping, logits only at labelled positions) and runs it for ``steps`` optimiser steps.
For resumable runs, evaluation, callbacks and checkpoints use the trainer (or ``peftkit train``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor

from peftkit.models.peft_model import PeftModel
from peftkit.training.config import TrainingConfig
from peftkit.training.optim import LRSchedule
from peftkit.training.trainer import Trainer


@dataclass
class FitResult:
    """What a training run measured."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup to 1, then linear decay to 0 at ``total_steps``."""
    return LRSchedule(1.0, total_steps, warmup_steps, "linear").factor


def fit(
    model: PeftModel,
    batches: Iterable[dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    max_grad_norm: float = 1.0,
    progress: bool = True,
    description: str = "training",
) -> FitResult:
    """Train ``model``'s trainable parameters for ``steps`` optimiser steps on ``batches``."""
    config = TrainingConfig(
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm,
        max_steps=steps,
        scheduler="linear",
        eval_at_end=False,
    )
    trainer = Trainer(model, batches, config, progress=progress, description=description)
    result = trainer.train()
    return FitResult(losses=result.losses, seconds=result.session_seconds, tokens=result.session_tokens)
