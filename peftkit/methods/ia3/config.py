"""Configuration of (IA)³ (Liu et al., 2022, https://arxiv.org/abs/2205.05638). Field names and
defaults are PEFT's ``IA3Config``."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import field_validator, model_validator

from peftkit.methods.tuners.config import TunerConfig, module_names


class IA3Config(TunerConfig):
    """(IA)³: learned vectors that rescale activations.

    Attention-type targets scale their output, ``y = l ⊙ (W x + b)`` with ``l`` ``(out,)``;
    feed-forward targets scale their input, ``y = W (l ⊙ x) + b`` with ``l`` ``(in,)``.
    Trainable parameters per adapted layer: ``out`` (or ``in`` for feed-forward modules).
    """

    peft_type: Literal["IA3"] = "IA3"
    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is scaled (``down_proj``, GPT-2's ``mlp.c_proj``): names (a path ending with
    the name matches, as in PEFT) or a regex. Must be among ``target_modules``. ``None``: the model
    type's default."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``); resolved from the layers."""
    init_ia3_weights: bool = True
    """``True``: vectors start at 1 (the base model); ``False``: random normal (for tests)."""

    @field_validator("feedforward_modules", mode="before")
    @classmethod
    def _feedforward_names(cls, value: Any) -> Any:
        return module_names(value, "feedforward_modules")

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> Self:
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list):
            stray = sorted(set(feedforward) - set(targets))
            if stray:
                raise ValueError(
                    f"feedforward_modules {stray} are not in target_modules {targets}; "
                    "feedforward_modules must be a subset of target_modules"
                )
        return self
