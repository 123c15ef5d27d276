"""Configuration of VeRA (Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454). Field names and
defaults are PEFT's ``VeraConfig``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from peftkit.methods.tuners.config import LayeredTunerConfig, check_bias, check_positive, check_probability


class VeraConfig(LayeredTunerConfig):
    """VeRA: ``y = W x + Λ_b B Λ_d A x`` with one pair of frozen random projections ``A`` ``(r, in_max)``
    and ``B`` ``(out_max, r)`` shared by every adapted layer, and two trained vectors per layer.

    Trainable parameters per adapted layer: ``out + r``.
    """

    #: PEFT's VeraConfig has no ``exclude_modules``: written only when set.
    extension_fields: ClassVar[frozenset[str]] = frozenset({"exclude_modules"})

    peft_type: Literal["VERA"] = "VERA"
    r: int = 256
    """Rank of the shared random projections; > 0 (may exceed the layers' dimensions)."""
    projection_prng_key: int = 0
    """Seed of the generator that draws ``vera_A`` / ``vera_B`` (Kaiming-uniform, on the CPU)."""
    save_projection: bool = True
    """Save ``vera_A`` / ``vera_B`` in the file (as PEFT: ``base_model.vera_A``); otherwise they are
    regenerated from ``projection_prng_key`` on load."""
    vera_dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    d_initial: float = 0.1
    """Initial value of every entry of ``vera_lambda_d``."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``); resolved from the layers."""
    bias: str = "none"
    """Which base-model biases train: ``"none"``, ``"all"`` or ``"vera_only"``."""
    init_weights: bool = True
    """``True``: ``vera_lambda_b = 0`` (the base model), ``vera_lambda_d = d_initial``; ``False``:
    ``vera_lambda_b = 1`` and ``vera_lambda_d`` random normal (for tests)."""

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        return check_positive(value, "r")

    @field_validator("vera_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        return check_probability(value, "vera_dropout")

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: str) -> str:
        return check_bias(value, "vera_only")
