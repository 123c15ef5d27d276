"""Training many experts of a bank in one run, each exactly as if it were trained alone.

A bank's trainable table has one row per expert (:mod:`peftkit.experts.bank`). Rows of a batch
that belong to different experts touch disjoint rows of the table, so one backward pass computes
every expert's gradient at once. What makes each expert's result equal to a run of its own is
what happens around the gradient, all per expert ``e``:

* **loss**: each labelled token of ``e``'s rows is weighted ``1 / N_e``, ``N_e`` = ``e``'s label
  tokens in the step (over every micro-batch and process), so ``e``'s gradient is the gradient of
  its own mean loss;
* **clipping**: ``e``'s gradient norm over its rows of every bank tensor, clipped on its own;
* **schedule**: ``e``'s learning rate follows its own step count and its own run length;
* **optimiser**: AdamW / Adam / SGD state per row, with ``e``'s own step count in Adam's bias
  correction; an expert absent from a step is not touched at all (no weight decay, no momentum).

The arithmetic follows ``torch.optim`` (AdamW, Adam, SGD with momentum) and
``torch.nn.utils.clip_grad_norm_`` step for step, vectorised over the experts present.
Optimiser state is saved keyed by expert id, so a bank may grow between runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.experts.bank import ExpertBank, expert_row
from peftkit.methods.base import IGNORE_INDEX
from peftkit.training.optim import OPTIMIZERS, LRSchedule
from peftkit.training.update import NonFiniteGradientError


def trainable_bank(model: Any) -> tuple[str, ExpertBank] | None:
    """The one bank adapter whose table trains, when every trainable tensor belongs to it."""
    banks = [
        (name, adapter)
        for name, adapter in model.adapters.items()
        if isinstance(adapter, ExpertBank) and any(p.requires_grad for p in adapter.adapter_parameters())
    ]
    if len(banks) != 1:
        return None
    name, bank = banks[0]
    own = {id(p) for p in bank.adapter_parameters()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
    if others:
        raise ValueError(
            f"training the experts of bank {name!r} one by one needs every other adapter frozen; "
            f"trainable outside it: {others[:5]} (freeze them, or train them in another stage)"
        )
    return name, bank


class ExpertUpdate:
    """Per-expert loss normalisation, clipping, schedule and optimiser for one bank's table.

    Args:
        adapter_name: the bank's adapter name (routes name it).
        bank: the bank adapter; each trainable tensor's first dimension splits into its experts.
        config: the run's :class:`~peftkit.training.config.TrainingConfig`.
        expert_steps: ``{expert id: optimiser steps of its own run}`` (its schedule's length).
    """

    def __init__(self, adapter_name: str, bank: ExpertBank, config: Any, expert_steps: dict[str, int]) -> None:
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        self.adapter_name, self.bank, self.config = adapter_name, bank, config
        self.params = [(n, p) for n, p in bank.named_parameters() if p.requires_grad]  # type: ignore[attr-defined]
        n = bank.num_experts
        device = self.params[0][1].device
        self.steps = torch.zeros(n, dtype=torch.long)
        self.totals = torch.zeros(n, dtype=torch.long)
        for expert, total in expert_steps.items():
            self.totals[expert_row(bank, expert, adapter_name)] = total
        self.moments: dict[str, dict[str, Tensor]] = {name: {} for name, _ in self.params}
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.present = torch.zeros(n, dtype=torch.bool, device=device)

    # ------------------------------------------------------------------ loss normalisation
    def row_experts(self, routes: Sequence[dict[str, Any]]) -> Tensor:
        """``(b,)`` the bank row each batch row trains (``-1``: none)."""
        return torch.tensor([expert_row(self.bank, r.get(self.adapter_name), self.adapter_name) for r in routes])

    def count(self, batches: Sequence[Any], dist: Any) -> None:
        """Each expert's label tokens over the step's micro-batches and processes."""
        counts = torch.zeros(self.bank.num_experts, dtype=torch.float64)
        for batch in batches:
            if batch.rows:
                counts.index_add_(0, *self._token_rows(batch))
        self.counts = dist.sum_(counts)
        self.present = (self.counts > 0).to(self.present.device)

    def _token_rows(self, batch: Any) -> tuple[Tensor, Tensor]:
        experts = self.row_experts(batch.routes)
        labelled = batch.tensors["labels"][:, 1:] != IGNORE_INDEX  # (b, L-1)
        if bool(((experts < 0) & labelled.any(-1)).any()):  # per row: labelled, yet no expert
            raise ValueError(f"a labelled row of the batch names no expert of bank {self.adapter_name!r}")
        per_row = labelled.sum(-1).double()
        return experts.clamp_min(0), per_row

    def token_weights(self, batch: Any) -> Tensor:
        """``(T,)`` weight of each labelled target, in the order the model returns them: ``1 / N_e``."""
        experts = self.row_experts(batch.routes)
        labelled = batch.tensors["labels"][:, 1:] != IGNORE_INDEX
        rows = labelled.nonzero()[:, 0]
        return (1.0 / self.counts[experts[rows]]).float()

    # ------------------------------------------------------------------ the update
    def _rows(self, tensor: Tensor) -> Tensor:
        return tensor.view(self.bank.num_experts, -1)

    def apply(self, step: int, model: Any) -> tuple[float, float]:
        """Update the experts present in the step; returns (mean learning rate, largest expert norm)."""
        index = self.present.nonzero().squeeze(1)
        grads = {name: self._rows(p.grad)[index] if p.grad is not None else None for name, p in self.params}
        squares = sum(g.float().pow(2).sum(-1) for g in grads.values() if g is not None)
        norms = torch.as_tensor(squares).sqrt() if index.numel() else torch.zeros(0)
        if index.numel() and not bool(torch.isfinite(norms).all()):
            raise NonFiniteGradientError(float(norms.max()))
        if self.config.max_grad_norm is not None and index.numel():
            coef = (self.config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
            grads = {n: g * coef.view(-1, 1).to(g.dtype) if g is not None else None for n, g in grads.items()}
        cpu_index = index.cpu()
        self.steps[cpu_index] += 1
        lrs = self._learning_rates(cpu_index)
        with torch.no_grad():
            for name, param in self.params:
                if grads[name] is not None:
                    self._step(name, param, index, grads[name], lrs.to(param.device, torch.float32), cpu_index)
        model.after_optimizer_step(step)
        for _, param in self.params:
            param.grad = None
        mean_lr = float(lrs.mean()) if lrs.numel() else 0.0
        return mean_lr, float(norms.max()) if norms.numel() else 0.0

    def _learning_rates(self, index: Tensor) -> Tensor:
        """Each present expert's learning rate at its own step (counting from 0)."""
        c = self.config
        values = []
        for row in index.tolist():
            total = int(self.totals[row])
            warmup = c.warmup_steps or round((c.warmup_ratio or 0.0) * total)
            values.append(LRSchedule(c.lr, total, warmup, c.scheduler, c.min_lr_ratio).lr_at(int(self.steps[row]) - 1))
        return torch.tensor(values, dtype=torch.float64)

    def _step(self, name: str, param: nn.Parameter, index: Tensor, grad: Tensor, lr: Tensor, cpu_index: Tensor) -> None:
        c, rows, state = self.config, self._rows(param.data), self.moments[name]
        p = rows[index]
        lr_ = lr.view(-1, 1)
        if c.optimizer == "sgd":
            if c.weight_decay:
                grad = grad.add(p, alpha=c.weight_decay)
            if c.momentum:
                buf = state.setdefault("momentum_buffer", torch.zeros_like(rows))
                fresh = (self.steps[cpu_index] == 1).to(param.device).view(-1, 1)
                update = torch.where(fresh, grad, buf[index] * c.momentum + grad)
                buf[index] = update
                grad = update
            rows[index] = p - lr_ * grad
            return
        beta1, beta2, eps = c.adam_beta1, c.adam_beta2, c.adam_epsilon
        if c.optimizer == "adamw":
            p = p * (1 - lr_ * c.weight_decay)
        elif c.weight_decay:
            grad = grad.add(p, alpha=c.weight_decay)
        exp_avg = state.setdefault("exp_avg", torch.zeros_like(rows))
        exp_avg_sq = state.setdefault("exp_avg_sq", torch.zeros_like(rows))
        m = exp_avg[index].lerp(grad, 1 - beta1)
        v = exp_avg_sq[index] * beta2 + (1 - beta2) * grad * grad
        exp_avg[index], exp_avg_sq[index] = m, v
        steps = self.steps[cpu_index].double()
        correction1 = (1 - beta1**steps).to(param.device).view(-1, 1)
        correction2_sqrt = (1 - beta2**steps).sqrt().to(param.device).view(-1, 1)
        step_size = (lr_.double() / correction1).float()
        denom = v.sqrt() / correction2_sqrt.float() + eps
        rows[index] = p - step_size * m / denom

    # ------------------------------------------------------------------ checkpoints
    def schedule_state(self) -> dict[str, Any]:
        c = self.config
        return {"per_expert": True, "lr": c.lr, "warmup": c.warmup_steps, "kind": c.scheduler}

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Optimiser state keyed by expert id: rows follow ``expert_ids``."""
        tensors: dict[str, Tensor] = {f"param/{n}": p.detach() for n, p in self.params}
        for name, values in self.moments.items():
            for key, value in values.items():
                tensors[f"expert_optim/{name}/{key}"] = self._rows(value)
        tensors["expert_optim/steps"] = self.steps
        meta = {"optimizer": {"experts": self.bank.experts.ids, "kind": self.config.optimizer}}
        return {**meta, "schedule": self.schedule_state()}, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore rows by expert id: experts added since the checkpoint start fresh."""
        saved_ids = meta["optimizer"]["experts"]
        missing = [i for i in saved_ids if i not in self.bank.experts]
        if missing:
            raise ValueError(f"the checkpoint trains experts this bank does not hold: {missing[:5]}")
        target = torch.tensor([self.bank.experts.row(i) for i in saved_ids], dtype=torch.long)
        with torch.no_grad():
            for name, param in self.params:
                saved = tensors[f"param/{name}"].view(len(saved_ids), -1).to(param.device, param.dtype)
                self._rows(param.data)[target.to(param.device)] = saved
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    stored = tensors.get(f"expert_optim/{name}/{key}")
                    if stored is not None:
                        rows = self.moments[name].setdefault(key, torch.zeros_like(self._rows(param.data)))
                        rows[target.to(param.device)] = stored.to(param.device, param.dtype)
        self.steps[target] = tensors["expert_optim/steps"].long()


def steps_alone(per_epoch: int, epochs: int | None, max_steps: int | None) -> int:
    """Optimiser steps of a run of its own on ``per_epoch`` batches (as ``Trainer`` counts them)."""
    limit = epochs if epochs is not None else (1 if max_steps is None else None)
    if limit is None:
        assert max_steps is not None
        return max_steps
    steps = limit * per_epoch
    return min(steps, max_steps) if max_steps is not None else steps
