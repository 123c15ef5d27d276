"""Callbacks: code that runs at named events of the training loop, without forking it.

Events, in the order a run emits them::

    on_train_begin
    ┌─ on_step_end          after every optimiser step, with that step's metrics
    │  on_epoch_end         after the step that finished a pass over the data
    │  on_evaluate          after an evaluation (every ``eval_every`` steps, and at the end)
    └─ on_checkpoint        after a checkpoint is complete on disk
    on_train_end

A callback stops training with ``state.request_stop(reason)``; the loop finishes the current step,
writes a final checkpoint and ends normally. A callback's ``state_dict()`` (JSON values) is saved
in every checkpoint and handed back to ``load_state_dict`` on resume, so e.g. early stopping keeps
its patience count across a restart.

Register your own: ``register_callback("name", MyCallback)``; the config's options are passed to
its constructor as keyword arguments.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.data.pipeline import DataPosition


@dataclass
class TrainerState:
    """Counters of a run; what callbacks read and what a checkpoint restores.

    Attributes:
        step: optimiser steps completed.
        total_steps: steps the run will take (``None`` until known).
        epoch: passes over the training data completed.
        micro_batches: global micro-batches consumed.
        tokens: attended tokens processed (all processes).
        label_tokens: labelled tokens trained on (all processes).
        train_seconds: time spent in training steps (not evaluation or checkpoints).
        data_position: where the next batch starts.
    """

    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    micro_batches: int = 0
    tokens: int = 0
    label_tokens: int = 0
    train_seconds: float = 0.0
    data_position: DataPosition = field(default_factory=DataPosition)
    should_stop: bool = False
    stop_reason: str | None = None
    last_checkpoint: Path | None = None

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step."""
        self.should_stop, self.stop_reason = True, reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "micro_batches": self.micro_batches,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "train_seconds": self.train_seconds,
            "data_position": self.data_position.to_dict(),
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason,
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        for key in ("step", "epoch", "micro_batches", "tokens", "label_tokens"):
            setattr(self, key, int(data[key]))
        self.train_seconds = float(data["train_seconds"])
        self.data_position = DataPosition.from_dict(data["data_position"])
        self.should_stop = bool(data.get("should_stop", False))
        self.stop_reason = data.get("stop_reason")


class Callback:
    """Base class: override the events you need. Every method is optional."""

    def on_train_begin(self, state: TrainerState) -> None: ...

    def on_step_end(self, state: TrainerState, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: TrainerState) -> None: ...

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, state: TrainerState, path: Path) -> None: ...

    def on_train_end(self, state: TrainerState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


EVENTS = ("on_train_begin", "on_step_end", "on_epoch_end", "on_evaluate", "on_checkpoint", "on_train_end")


class CallbackList:
    """Dispatches each event to every callback, in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, event: str) -> Any:
        if event not in EVENTS:
            raise AttributeError(event)

        def dispatch(*args: Any) -> None:
            for callback in self.callbacks:
                getattr(callback, event)(*args)

        return dispatch

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"class": type(c).__name__, "state": c.state_dict()} for c in self.callbacks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        found = [s["class"] for s in states]
        expected = [type(c).__name__ for c in self.callbacks]
        if found != expected:
            raise ValueError(f"the checkpoint holds state for callbacks {found}, this run has {expected}")
        for callback, saved in zip(self.callbacks, states, strict=True):
            callback.load_state_dict(saved["state"])


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` reports.

    The metric is read from evaluation results (``eval/...``) or from step metrics
    (``train/...``), whichever carries it.

    Args:
        metric: e.g. ``eval/loss`` or ``train/loss``.
        mode: ``min`` (lower is better) or ``max``.
        patience: reports without improvement before stopping.
        min_delta: smallest change that counts as an improvement.
    """

    def __init__(self, *, metric: str = "eval/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if not metric.startswith(("train/", "eval/")):
            raise ValueError(f"metric must name a train/... or eval/... value (e.g. eval/loss), got {metric!r}")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_reports = 0

    def on_step_end(self, state: TrainerState, metrics: dict[str, Any]) -> None:
        self._observe(state, metrics, "train")

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float]) -> None:
        self._observe(state, metrics, "eval")

    def _observe(self, state: TrainerState, metrics: dict[str, Any], kind: str) -> None:
        if self.metric not in metrics:
            if self.metric.startswith(f"{kind}/"):  # a misspelled name must not silently never fire
                known = ", ".join(sorted(k for k in metrics if k.startswith(f"{kind}/")))
                raise ValueError(f"early_stopping: metric {self.metric!r} is not among the {kind} metrics ({known})")
            return
        value = float(metrics[self.metric])
        better = (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better and math.isfinite(value):
            self.best, self.best_step, self.bad_reports = value, state.step, 0
            return
        self.bad_reports += 1
        if self.bad_reports >= self.patience:
            state.request_stop(
                f"early stopping: {self.metric} has not improved for {self.patience} report(s) "
                f"(best {self.best:.6g} at step {self.best_step})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_reports": self.bad_reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_reports = state["best"], state["best_step"], int(state["bad_reports"])


class BestCheckpoint(Callback):
    """Keep a copy of the checkpoint written at the best evaluation so far, in ``<output_dir>/best/``.

    The folder is a complete checkpoint (``adapter/`` in PEFT format, training state, config) plus
    ``best.json`` (``{"metric", "value", "step"}``); it is replaced atomically when a later
    evaluation is better, and survives the rotation of ``keep_checkpoints``. It needs a checkpoint
    at every evaluation step: ``training.checkpoint_every`` must divide ``training.eval_every``
    (checked when the config is read).

    Args:
        metric: an evaluation result, e.g. ``eval/loss`` or ``eval/accuracy``.
        mode: ``min`` (lower is better) or ``max``.
    """

    def __init__(self, *, metric: str = "eval/loss", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.pending: tuple[int, float] | None = None  # a better evaluation whose checkpoint is not written yet

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ValueError(
                f"best_checkpoint: metric {self.metric!r} is not among the evaluation results "
                f"({', '.join(sorted(metrics))})"
            )
        value = float(metrics[self.metric])
        if math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        ):
            self.pending = (state.step, value)

    def on_checkpoint(self, state: TrainerState, path: Path) -> None:
        if self.pending is None:
            return
        step, value = self.pending
        self.pending = None
        if step != state.step:  # the weights of that step are gone; config validation prevents this
            warnings.warn(f"best_checkpoint: no checkpoint was written at step {step}; it is not kept", stacklevel=2)
            return
        self.best, self.best_step = value, step
        if int(os.environ.get("RANK", "0")) == 0:  # one process writes (all share the output folder)
            keep_copy(path, path.parent.parent / "best", {"metric": self.metric, "value": value, "step": step})

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]


def keep_copy(checkpoint: Path, target: Path, info: dict[str, Any]) -> None:
    """Replace ``target`` with a copy of ``checkpoint`` plus ``best.json``, atomically (a rename)."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    (tmp / "best.json").write_text(json.dumps({**info, "checkpoint": checkpoint.name}, indent=1) + "\n")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


_CALLBACKS: dict[str, type[Callback]] = {"early_stopping": EarlyStopping, "best_checkpoint": BestCheckpoint}


def register_callback(name: str, cls: type[Callback] | None = None) -> Any:
    """Register a callback class under ``name`` (usable as a decorator)."""

    def add(callback_cls: type[Callback]) -> type[Callback]:
        _CALLBACKS[name] = callback_cls
        return callback_cls

    return add(cls) if cls is not None else add


def known_callbacks() -> list[str]:
    return sorted(_CALLBACKS)


def build_callback(name: str, options: dict[str, Any]) -> Callback:
    if name not in _CALLBACKS:
        raise ValueError(f"unknown callback {name!r}; known callbacks: {', '.join(known_callbacks())}")
    cls = _CALLBACKS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p, s in params.items() if s.kind in (s.KEYWORD_ONLY, s.POSITIONAL_OR_KEYWORD) and p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"callback {name!r} takes no option(s) {unknown}; it takes: {accepted or 'none'}")
    return cls(**options)


def check_callback(name: str, options: dict[str, Any]) -> None:
    build_callback(name, options)
