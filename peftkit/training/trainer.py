"""The training loop: one optimiser step at a time, callbacks at named events.

One step, read top to bottom (:meth:`Trainer.train_step`):

1. count the label tokens of the step's micro-batches, summed over processes: ``N``;
2. for each micro-batch: forward with logits at labelled positions only, loss = Σ over its
   labelled tokens, backward of ``loss / N`` (gradients accumulate, so accumulating 4 × 2 rows
   is one batch of 8 rows, and N processes are one process);
3. sum the trainable gradients and the loss sums over processes (one ``all_reduce``);
4. a non-finite loss or gradient stops the run here, before the update; the last checkpoint stays;
5. gradient hooks (opt-in) on the finished gradients, clipping, learning rate for this step,
   ``optimizer.step()``, then ``model.after_optimizer_step(step)`` (AdaLoRA's budget and the like).

Around it, :meth:`Trainer.train` logs metrics, fires callbacks, evaluates and checkpoints at their
cadence, and writes the final adapter, a checkpoint and the loss curve at the end.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from peftkit.data.experts import ExpertData
from peftkit.data.pipeline import Batch, TokenizedData
from peftkit.methods.base import IGNORE_INDEX
from peftkit.training.callbacks import Callback, CallbackList, TrainerState
from peftkit.training.config import GradientHooksConfig, TrainingConfig
from peftkit.training.distributed import Distributed
from peftkit.training.experts import ExpertUpdate, trainable_bank
from peftkit.training.gradients import run_gradient_hooks
from peftkit.training.losses import CompositeLoss, CrossEntropy, LossInputs
from peftkit.training.records import CURVE_FILE, MetricsLog, TrainingProgress, plot_loss_curve, read_metrics
from peftkit.training.resume import load_trainer_checkpoint, save_trainer_checkpoint
from peftkit.training.update import NonFiniteGradientError, ParameterUpdate

Evaluator = Callable[[Any], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf; the update was not applied."""


@dataclass
class TrainResult:
    """What a run did."""

    state: TrainerState
    losses: list[float] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    session_tokens: int = 0
    session_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.session_tokens / self.session_seconds if self.session_seconds else 0.0


class Trainer:
    """Trains the trainable parameters of a :class:`~peftkit.PeftModel`.

    Args:
        model: the adapted model; every parameter with ``requires_grad`` is optimised.
        data: a :class:`~peftkit.data.pipeline.TokenizedData` (resumable), or any iterable of
            batches ``{"input_ids", "attention_mask", "labels"}`` (then ``max_steps`` is needed).
        config: optimisation, schedule, cadence, precision.
        loss: the loss (default: cross-entropy).
        eval_data: held-out data; its loss is ``eval/loss``.
        evaluate: ``evaluate(model) -> {name: value}`` run at the eval cadence (in eval mode,
            without gradients); its results are logged under ``eval/`` and passed to
            ``on_evaluate`` (where e.g. early stopping or a best-checkpoint callback reads them).
        output_dir: where checkpoints, metrics and the final adapter go (``None``: nothing written).
        config_text: the resolved run config, written beside every checkpoint.
    """

    def __init__(
        self,
        model: Any,
        data: TokenizedData | Iterable[dict[str, Tensor]],
        config: TrainingConfig,
        *,
        loss: CompositeLoss | None = None,
        callbacks: Sequence[Callback] = (),
        eval_data: TokenizedData | None = None,
        evaluate: Evaluator | None = None,
        gradient_hooks: GradientHooksConfig | None = None,
        output_dir: str | Path | None = None,
        config_text: str | None = None,
        dist: Distributed | None = None,
        teachers: dict[str, Any] | None = None,
        progress: bool = True,
        description: str = "training",
        tensorboard: bool = False,
        console: Console | None = None,
    ) -> None:
        self.model, self.data, self.config = model, data, config
        self.loss = loss or CompositeLoss([("cross_entropy", 1.0, CrossEntropy())])
        self.callbacks = CallbackList(callbacks)
        self.eval_data, self.evaluate_fn = eval_data, evaluate
        self.hooks = gradient_hooks or GradientHooksConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if config.eval_every and eval_data is None and evaluate is None:
            raise ValueError(f"training.eval_every={config.eval_every} needs eval data or an evaluate function")
        if config.checkpoint_every and self.output_dir is None:
            raise ValueError(f"training.checkpoint_every={config.checkpoint_every} needs an output_dir")
        self.config_text, self.teachers = config_text, teachers or {}
        self.dist = dist or Distributed()
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (is the adapter frozen?)")
        self.device = self.params[0][1].device
        self.state = TrainerState()
        self.per_epoch = data.batches_per_epoch() if isinstance(data, TokenizedData) else None
        self.update: ParameterUpdate | ExpertUpdate
        if isinstance(data, ExpertData):  # many experts, each trained as if alone
            self.update, self.expert_steps = self._expert_update(data)
            self.state.total_steps = max(self.expert_steps.values())
        else:
            self.state.total_steps = self._total_steps()
            self.update = ParameterUpdate(self.params, config, self.state.total_steps)
        writes = self.dist.is_main and self.output_dir is not None
        self.metrics = MetricsLog(self.output_dir if writes else None, tensorboard and writes)
        self.progress = TrainingProgress(self.state.total_steps, description, progress and self.dist.is_main, console)
        self.result = TrainResult(self.state)

    def _expert_update(self, data: ExpertData) -> tuple[ExpertUpdate, dict[str, int]]:
        found = trainable_bank(self.model)
        if found is None:
            raise ValueError("many-expert data needs one bank adapter whose experts train (see docs/experts.md)")
        if self.config.gradient_accumulation_steps != 1:
            raise ValueError(
                "training.gradient_accumulation_steps must be 1 with many experts: each step already takes every "
                "expert's batch in micro-batches of data.micro_batch_size rows"
            )
        steps = data.steps(self.config.epochs, self.config.max_steps)
        return ExpertUpdate(*found, self.config, steps), steps

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.update.optimizer

    @property
    def schedule(self) -> Any:
        return self.update.schedule

    @property
    def epoch_limit(self) -> int | None:
        """Passes over the data the run may make: ``epochs``; if unset, one without ``max_steps``, and
        as many as ``max_steps`` needs with it."""
        if self.config.epochs is not None:
            return self.config.epochs
        return 1 if self.config.max_steps is None else None

    def _total_steps(self) -> int:
        """Optimiser steps of the run: ``max_steps``, or what the epoch limit amounts to, whichever is
        fewer. Streamed data (unknown length) needs ``max_steps``; ``epochs`` then still stops it early."""
        epochs, max_steps = self.epoch_limit, self.config.max_steps
        if self.per_epoch is None:
            if max_steps is None:
                raise ValueError("training.max_steps is required when the number of batches is unknown (streamed data)")
            return max_steps
        if epochs is None:
            assert max_steps is not None
            return max_steps
        steps = math.ceil(epochs * self.per_epoch / self.config.gradient_accumulation_steps)
        return min(steps, max_steps) if max_steps is not None else steps

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        """Run until ``total_steps``, the end of the epochs, or a callback's stop request."""
        state, config = self.state, self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.dist.is_main:
            self.metrics.start_fresh()
        self.dist.broadcast_parameters([p for _, p in self.params])
        batches = self._batches()
        self.model.train()
        self.callbacks.on_train_begin(state)
        last_eval = last_checkpoint = -1
        with self.progress:
            while state.step < state.total_steps and not state.should_stop and not self._epochs_done():
                micro = self._next_micro_batches(batches)
                if not micro:
                    break
                metrics = self.train_step(micro)
                due = state.step % config.log_every == 0 or state.step == state.total_steps
                if due or any(k.startswith("grad/") for k in metrics):
                    self.metrics.write(metrics)
                self.callbacks.on_step_end(state, metrics)
                for _ in range(sum(b.epoch_end for b in micro)):  # a step may end several (tiny) epochs
                    state.epoch += 1
                    self.callbacks.on_epoch_end(state)
                if config.eval_every and state.step % config.eval_every == 0 and self._can_evaluate():
                    self.evaluate()
                    last_eval = state.step
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_checkpoint = state.step
                state.should_stop = not self.dist.all_agree(not state.should_stop)
        if config.eval_at_end and self._can_evaluate() and last_eval != state.step:
            self.evaluate()
        if self.output_dir is not None:
            if last_checkpoint != state.step:
                self.save_checkpoint()
            self._write_final_outputs()
        self.model.eval()
        self.callbacks.on_train_end(state)
        return self.result

    def train_step(self, micro: Sequence[Batch]) -> dict[str, Any]:
        """One optimiser step over ``micro`` (this process's share of each micro-batch)."""
        state, start = self.state, time.perf_counter()
        experts = self.update if isinstance(self.update, ExpertUpdate) else None
        if experts is not None:
            experts.count(micro, self.dist)
        local = [sum(b.num_label_tokens for b in micro), sum(b.num_tokens for b in micro)]
        counts = self.dist.sum_(torch.tensor(local, dtype=torch.float64))
        label_tokens, tokens = int(counts[0]), int(counts[1])
        if label_tokens == 0:
            raise ValueError(f"step {state.step + 1}: its micro-batches have no labelled token")
        sums = torch.zeros(len(self.loss.names) + 1, dtype=torch.float64)  # + the adapters' regularisation
        for batch in micro:
            if batch.rows == 0:  # a short last batch left this process no rows
                continue
            weights = experts.token_weights(batch) if experts is not None else None
            with self._autocast():
                total, parts = self.loss(self._loss_inputs(batch), weights)
                # The adapters' own term (AdaLoRA's orthogonality penalty) counts once per step: each
                # micro-batch adds its share, in proportion to its label tokens (over all processes).
                regularization = self._regularization()
            share = batch.num_label_tokens / label_tokens
            objective = total if weights is not None else total / label_tokens  # weights: 1 / N_e per token
            if regularization is not None:
                objective = objective + share * regularization
                sums[-1] += share * float(regularization.detach())
            objective.backward()
            sums[:-1] += torch.stack([parts[n].double().cpu() for n in self.loss.names])
        sums = self.dist.sum_gradients_and([p for _, p in self.params], sums)
        components = {name: (sums[i] / label_tokens).item() for i, name in enumerate(self.loss.names)}
        loss = sum(w * components[n] for n, w, _ in self.loss.components) + sums[-1].item()
        if sums[-1]:
            components["regularization"] = sums[-1].item()
        if not math.isfinite(loss):
            raise TrainingDivergedError(self._divergence(f"the loss became {loss}", components))
        gradient_stats: dict[str, Any] = {}
        if self.hooks.hooks and self.dist.is_main and (state.step + 1) % self.hooks.every == 0:
            gradient_stats = run_gradient_hooks(self.hooks.hooks, [(n, p.grad) for n, p in self.params], self.hooks)
        try:
            lr, grad_norm = self.update.apply(state.step, self.model)
        except NonFiniteGradientError as exc:
            raise TrainingDivergedError(self._divergence(str(exc), components)) from None

        seconds = time.perf_counter() - start
        state.step += 1
        state.micro_batches += len(micro)
        state.tokens += tokens
        state.label_tokens += label_tokens
        state.train_seconds += seconds
        if micro[-1].position is not None:
            state.data_position = micro[-1].position
        self.result.losses.append(loss)
        self.result.session_tokens += tokens
        self.result.session_seconds += seconds
        epoch = state.micro_batches / self.per_epoch if self.per_epoch else state.epoch
        metrics: dict[str, Any] = {"step": state.step, "epoch": round(epoch, 4), "train/loss": loss}
        if len(components) > 1:
            metrics.update({f"train/loss/{n}": v for n, v in components.items()})
        metrics.update({"train/lr": lr, "train/grad_norm": grad_norm, "train/tokens": state.tokens})
        metrics.update({"train/label_tokens": state.label_tokens, "train/tokens_per_second": tokens / seconds})
        metrics.update(gradient_stats)
        self.progress.update(state.step, loss, lr, self.result.tokens_per_second)
        return metrics

    def _regularization(self) -> Tensor | None:
        term = getattr(self.model, "regularization_loss", None)
        return term() if term is not None else None

    def _loss_inputs(self, batch: Batch) -> LossInputs:
        tensors = {k: v.to(self.device) for k, v in batch.tensors.items()}
        routing = {"experts": batch.routes} if batch.routes is not None else {}
        out = self.model(
            **tensors, **routing, return_logits="labelled", output_hidden_states=self.loss.needs_hidden_states
        )
        following = tensors["labels"][:, 1:]
        targets = following[following != IGNORE_INDEX]
        if out.logits.shape[0] != targets.numel():
            raise ValueError("labels on a row's first token are not supported (nothing predicts it); mask them")
        return LossInputs(self.model, tensors, out.logits, targets, out.hidden_states, self.teachers)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batches(self) -> Iterator[Batch]:
        if isinstance(self.data, ExpertData):
            return self.data.batches(self.expert_steps, self.state.data_position)
        if isinstance(self.data, TokenizedData):
            return self.data.batches(self.state.data_position)
        return (Batch.from_tensors(t) for t in self.data)

    def _epochs_done(self) -> bool:
        if isinstance(self.data, ExpertData):  # each expert stops after its own run's steps
            return False
        return self.epoch_limit is not None and self.state.epoch >= self.epoch_limit

    def _next_micro_batches(self, batches: Iterator[Batch]) -> list[Batch]:
        """The step's micro-batches: ``gradient_accumulation_steps`` of them, fewer at the end of the last epoch."""
        micro: list[Batch] = []
        epochs_left = None if self.epoch_limit is None else self.epoch_limit - self.state.epoch
        for batch in batches:
            micro.append(batch)
            if batch.step_end is not None:  # many experts: the data says where a step ends
                if batch.step_end:
                    break
                continue
            if batch.epoch_end and epochs_left is not None:
                epochs_left -= 1
                if epochs_left == 0:
                    break
            if len(micro) == self.config.gradient_accumulation_steps:
                break
        return micro

    def _divergence(self, what: str, components: dict[str, float]) -> str:
        last = self.state.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        parts = ", ".join(f"{k}={v:.4g}" for k, v in components.items())
        return (
            f"training stopped at step {self.state.step + 1}: {what} ({parts}); the update was not applied and "
            f"{kept}. Lower training.lr, set training.max_grad_norm, or check the data, then resume with --resume."
        )

    # ------------------------------------------------------------------ evaluation
    def _can_evaluate(self) -> bool:
        return self.eval_data is not None or self.evaluate_fn is not None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval loss on ``eval_data`` (label-token weighted) plus the ``evaluate`` function's results."""
        was_training = self.model.training
        self.model.eval()
        metrics: dict[str, float] = {}
        if self.eval_data is not None:
            sums = torch.zeros(2, dtype=torch.float64)
            for batch in self.eval_data.one_pass():
                if batch.rows:
                    with self._autocast():
                        inputs = self._loss_inputs(batch)
                    sums[0] += float(CrossEntropy()(inputs).double().sum())
                    sums[1] += inputs.targets.numel()
            sums = self.dist.sum_(sums)
            metrics["eval/loss"] = (sums[0] / sums[1]).item()
            metrics["eval/label_tokens"] = int(sums[1])
        if self.evaluate_fn is not None:
            for key, value in self.evaluate_fn(self.model).items():
                metrics[key if key.startswith("eval/") else f"eval/{key}"] = float(value)
        self.model.train(was_training)
        self.result.eval_metrics = metrics
        self.metrics.write({"step": self.state.step, **metrics})
        self.callbacks.on_evaluate(self.state, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def save_checkpoint(self) -> Path | None:
        """Write the whole training state (rank 0); every process then hears ``on_checkpoint``."""
        return save_trainer_checkpoint(self)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the next step is the one after it."""
        load_trainer_checkpoint(self, path)

    def _write_final_outputs(self) -> None:
        assert self.output_dir is not None
        if self.dist.is_main:
            self.model.save_pretrained(self.output_dir / "adapter")
            self.result.adapter_dir = self.output_dir / "adapter"
            if self.metrics.path is not None and self.metrics.path.is_file():
                plot_loss_curve(read_metrics(self.metrics.path), self.output_dir / CURVE_FILE)
            self.metrics.close()
        self.dist.barrier()
