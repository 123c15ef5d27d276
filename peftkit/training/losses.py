"""The loss registry: ``cross_entropy``, ``kl_divergence``, ``mse``, your own, and weighted sums.

Every loss works on the *labelled positions* of a micro-batch only: the model projects hidden
states onto the vocabulary just there (``return_logits="labelled"``), so a classification example
with a 40-token prompt and a 1-token answer costs one vocabulary projection, not 40.

A loss returns per-token values ``(T,)`` for the ``T`` labelled targets of the micro-batch (or a
scalar, read as the mean over them). The trainer sums them over all micro-batches of an optimiser
step (and all processes) and divides by the total label-token count, so gradient accumulation and
data parallelism give the same update as one big batch.

Register your own::

    @register_loss("confidence_penalty")
    def confidence_penalty(inputs: LossInputs, *, beta: float = 0.1) -> Tensor:
        logp = inputs.logits.float().log_softmax(-1)
        return beta * (logp.exp() * logp).sum(-1)          # (T,): negative entropy per token

and use it in the config: ``loss: [{name: cross_entropy}, {name: confidence_penalty, weight: 0.5}]``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.methods.base import IGNORE_INDEX


@dataclass
class Reference:
    """Outputs of the reference model (frozen base or teacher) at the labelled positions."""

    logits: Tensor  # (T, V)
    hidden_states: tuple[Tensor, ...] | None  # each (T, D)


@dataclass
class LossInputs:
    """What a loss sees for one micro-batch.

    Attributes:
        model: the :class:`~peftkit.PeftModel` being trained.
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``(b, L)``.
        logits: ``(T, V)`` the adapted model's logits at the ``T`` labelled positions.
        targets: ``(T,)`` the token each of those positions should predict.
        hidden_states: per layer (embeddings first), ``(T, D)`` at the same positions, when a loss
            asked for them (``needs_hidden_states``).
        teachers: teacher name → model, loaded once per run.
    """

    model: Any
    batch: dict[str, Tensor]
    logits: Tensor
    targets: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    teachers: dict[str, nn.Module] = field(default_factory=dict)
    _references: dict[tuple[str, bool], Reference] = field(default_factory=dict)

    def reference(self, teacher: str | None = None, hidden_states: bool = False) -> Reference:
        """The frozen base model's outputs (``teacher=None``: the same model with adapters disabled)
        or a teacher's, at the labelled positions; computed without gradients, once per batch."""
        key = (teacher or "", hidden_states)
        if key not in self._references:
            with torch.no_grad():
                if teacher is None:
                    with self.model.disable_adapter():
                        out = self.model(**self.batch, return_logits="labelled", output_hidden_states=hidden_states)
                    ref = Reference(out.logits, out.hidden_states if hidden_states else None)
                else:
                    ref = teacher_outputs(self.teachers[teacher], self.batch, hidden_states)
            if ref.logits.shape != self.logits.shape:
                raise ValueError(
                    f"reference logits {tuple(ref.logits.shape)} do not match the model's {tuple(self.logits.shape)}"
                    " (a teacher must share the tokenizer and vocabulary)"
                )
            self._references[key] = ref
        return self._references[key]


def teacher_outputs(teacher: nn.Module, batch: dict[str, Tensor], hidden_states: bool) -> Reference:
    """A plain Hugging Face causal LM's logits (and hidden states) at the labelled positions."""
    labels, mask = batch["labels"], batch["attention_mask"]
    predicting = torch.cat([labels[:, 1:] != IGNORE_INDEX, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)
    out = teacher(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
        logits_to_keep=predicting,
        output_hidden_states=hidden_states,
    )
    hidden = tuple(h[predicting] for h in out.hidden_states) if hidden_states else None
    return Reference(out.logits, hidden)


LossFn = Callable[[LossInputs], Tensor]
_LOSSES: dict[str, tuple[Callable[..., LossFn], bool]] = {}


def register_loss(name: str, fn: Callable[..., Any] | None = None, *, needs_hidden_states: bool = False) -> Any:
    """Register a loss (usable as a decorator).

    ``fn`` is either a function ``fn(inputs, **options) -> Tensor`` or a class whose keyword-only
    ``__init__`` options build a callable ``loss(inputs) -> Tensor``. Options come from the config.
    """

    def add(function: Callable[..., Any]) -> Callable[..., Any]:
        _LOSSES[name] = (function, needs_hidden_states)
        return function

    return add(fn) if fn is not None else add


def known_losses() -> list[str]:
    return sorted(_LOSSES)


def check_loss(name: str, options: dict[str, Any]) -> None:
    """Validate a loss name and its options without building anything heavy."""
    build_loss(name, options)


def build_loss(name: str, options: dict[str, Any]) -> LossFn:
    """The loss ``name`` with its options applied; errors list the known names or accepted options."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(known_losses())}")
    function, needs_hidden = _LOSSES[name]
    target = function.__init__ if inspect.isclass(function) else function
    accepted = [p for p, s in inspect.signature(target).parameters.items() if s.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} takes no option(s) {unknown}; it takes: {accepted or 'none'}")
    parameters = inspect.signature(target).parameters
    missing = [p for p in accepted if parameters[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"loss {name!r} needs option(s) {missing}")
    if inspect.isclass(function):
        instance = function(**options)
        if needs_hidden:  # registered as needing them, whatever the class says
            instance.needs_hidden_states = True
        return instance
    loss = functools.partial(function, **options)
    loss.needs_hidden_states = needs_hidden  # type: ignore[attr-defined]
    return loss


# ---------------------------------------------------------------------- built-in losses
class CrossEntropy:
    """Next-token cross-entropy on the labelled tokens, ``-log p(target)`` per token.

    Args:
        label_smoothing: mix ``ε`` of a uniform target into the one-hot target.
    """

    needs_hidden_states = False

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, inputs: LossInputs) -> Tensor:
        return F.cross_entropy(
            inputs.logits.float(), inputs.targets, reduction="none", label_smoothing=self.label_smoothing
        )


class KLDivergence:
    """Distillation: ``τ² · KL(p_ref^τ ‖ p^τ)`` per labelled token, where ``p^τ = softmax(z / τ)``.

    The reference is the frozen base model (the same weights with adapters disabled: keeps the
    adapted model close to what it started from) or a ``teacher`` model sharing the tokenizer.
    The ``τ²`` factor keeps gradient sizes comparable across temperatures (Hinton et al., 2015,
    https://arxiv.org/abs/1503.02531).

    Args:
        temperature: softening ``τ > 0``.
        teacher: alias or folder of a teacher model; ``None`` = the frozen base model.
    """

    needs_hidden_states = False

    def __init__(self, *, temperature: float = 1.0, teacher: str | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.teacher = float(temperature), teacher

    def __call__(self, inputs: LossInputs) -> Tensor:
        ref = inputs.reference(self.teacher).logits.float() / self.temperature
        log_q = F.log_softmax(inputs.logits.float() / self.temperature, dim=-1)
        log_p = F.log_softmax(ref, dim=-1)
        return self.temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


class MeanSquaredError:
    """Squared difference to the reference model, averaged over the last dimension, per token.

    Args:
        target: ``logits`` or ``hidden_states``.
        layer: which hidden state (``-1``: the last layer's output; ``0``: the embeddings).
        teacher: alias or folder of a teacher model; ``None`` = the frozen base model.
    """

    def __init__(self, *, target: str = "logits", layer: int = -1, teacher: str | None = None) -> None:
        if target not in ("logits", "hidden_states"):
            raise ValueError(f"target must be 'logits' or 'hidden_states', got {target!r}")
        self.target, self.layer, self.teacher = target, int(layer), teacher
        self.needs_hidden_states = target == "hidden_states"

    def __call__(self, inputs: LossInputs) -> Tensor:
        if self.target == "logits":
            mine, ref = inputs.logits, inputs.reference(self.teacher).logits
        else:
            assert inputs.hidden_states is not None
            mine = inputs.hidden_states[self.layer]
            ref = inputs.reference(self.teacher, hidden_states=True).hidden_states[self.layer]  # type: ignore[index]
        return (mine.float() - ref.float()).pow(2).mean(-1)


register_loss("cross_entropy", CrossEntropy)
register_loss("kl_divergence", KLDivergence)
register_loss("mse", MeanSquaredError)


class CompositeLoss:
    """A weighted sum of named losses; each component's value is reported on its own.

    ``__call__`` returns ``(total, parts)``: ``total`` is ``Σ wᵢ · Σₜ lossᵢ(t)`` (a sum over the
    micro-batch's labelled tokens, ready to be divided by the step's token count), ``parts`` the
    unweighted per-component sums, detached, for the metrics log.
    """

    def __init__(self, components: list[tuple[str, float, LossFn]]) -> None:
        if not components:
            raise ValueError("a loss needs at least one component")
        names = [n for n, _, _ in components]
        if len(set(names)) != len(names):
            names = [f"{n}_{i}" for i, n in enumerate(names)]
        self.components = [(n, w, fn) for n, (_, w, fn) in zip(names, components, strict=True)]

    @classmethod
    def from_config(cls, components: list[Any]) -> CompositeLoss:
        return cls([(c.name, c.weight, build_loss(c.name, c.options)) for c in components])

    @property
    def needs_hidden_states(self) -> bool:
        return any(getattr(fn, "needs_hidden_states", False) for _, _, fn in self.components)

    @property
    def teachers(self) -> set[str]:
        return {t for _, _, fn in self.components if (t := getattr(fn, "teacher", None))}

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.components]

    def __call__(self, inputs: LossInputs, weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``weights`` ``(T,)``: a factor per labelled token in the total (many experts: ``1 / N_e``)."""
        count = inputs.targets.numel()
        total = inputs.logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        for name, weight, fn in self.components:
            value = fn(inputs)
            summed = value.sum() if value.ndim else value * count  # a scalar is a per-token mean
            parts[name] = summed.detach()
            if weights is None:
                total = total + weight * summed
            else:
                total = total + weight * ((value * weights).sum() if value.ndim else value * weights.sum())
        return total, parts
