"""A compact training loop for adapters: AdamW, warmup + linear decay, clipping, progress bar.

Only the adapter's trainable parameters are optimised; the base model stays frozen. Each step's
loss is the mean cross-entropy over the batch's labelled tokens. Logits are computed only at
labelled positions (``return_logits=False``), the cheap path for classification-style data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from peftkit.models.peft_model import PeftModel


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

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def fit(
    model: PeftModel,
    batches: Iterator[dict[str, Tensor]],
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
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (is the adapter frozen?)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup_steps, steps))
    result = FitResult()
    model.train()
    start = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=steps, loss=math.nan, lr=lr, tps=0.0)
        for _ in range(steps):
            batch = next(batches)
            out = model(**batch, return_logits=False)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"loss became {out.loss.item()} at step {len(result.losses)}")
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            model.after_optimizer_step(len(result.losses))
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(out.loss.item())
            result.tokens += int(batch["attention_mask"].sum())
            result.seconds = time.perf_counter() - start
            bar.update(
                task,
                advance=1,
                loss=result.losses[-1],
                lr=schedule.get_last_lr()[0],
                tps=result.tokens_per_second,
            )
    model.eval()
    return result
