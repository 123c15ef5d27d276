"""Configuration of AdaLoRA (Zhang et al., 2023, https://arxiv.org/abs/2303.10512). Field names and
defaults are PEFT's ``AdaLoraConfig`` (which extends ``LoraConfig``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self

from pydantic import field_validator, model_validator

from peftkit.methods.lora.config import LORA_UNSUPPORTED
from peftkit.methods.tuners.config import LayeredTunerConfig, check_bias, check_positive, check_probability


class AdaLoraConfig(LayeredTunerConfig):
    """AdaLoRA: an SVD-shaped update ``P Λ Q`` whose total rank budget is reallocated during training.

    Each layer starts at ``init_r``. After ``tinit`` warm-up steps the total budget shrinks with a
    cubic schedule to ``target_r`` per layer at step ``total_step - tfinal``, re-allocated every
    ``deltaT`` steps to the singular triplets with the highest smoothed sensitivity; the last ``tfinal``
    steps fine-tune the final ranks. Trainable parameters per adapted layer: ``init_r · (in + out + 1)``.
    """

    unsupported_defaults: ClassVar[dict[str, Any]] = LORA_UNSUPPORTED | {
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "alpha_pattern": {},
    }

    peft_type: Literal["ADALORA"] = "ADALORA"
    r: int = 8
    """Not used by AdaLoRA (PEFT's LoraConfig field); must stay 8 — set ``init_r`` instead."""
    lora_alpha: int | float = 8
    """Scale numerator: the update is ``lora_alpha / init_r · P Λ Q`` (``init_r`` when ``lora_alpha`` is 0)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``); resolved from the layers."""
    bias: str = "none"
    """Which base-model biases train: ``"none"``, ``"all"`` or ``"lora_only"``."""
    init_lora_weights: bool = True
    """``True``: ``Λ = 0``, ``P``, ``Q`` normal(0, 0.02) (the base model); ``False``: all standard normal."""
    target_r: int = 8
    """Average rank per layer at the end of the budget schedule; 0 <= target_r <= init_r."""
    init_r: int = 12
    """Rank every layer starts with; > 0."""
    tinit: int = 0
    """Warm-up steps before the budget starts shrinking."""
    tfinal: int = 0
    """Final steps that fine-tune with the ranks fixed."""
    deltaT: int = 1  # noqa: N815  (PEFT's field name)
    """Steps between two budget re-allocations; > 0."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity, in (0, 1)."""
    beta2: float = 0.85
    """EMA coefficient of the sensitivity's uncertainty, in (0, 1)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty ``‖PᵀP - I‖_F + ‖QQᵀ - I‖_F`` added to the training loss; >= 0."""
    total_step: int | None = None
    """Total optimiser steps of the run (required, > 0): the schedule's horizon."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Set by training: ``{"<module path>.lora_E": [kept, ...]}``, which singular triplets survived.
    Saved files hold only the kept triplets."""

    @field_validator("r")
    @classmethod
    def _r_unused(cls, value: int) -> int:
        if value != 8:
            raise ValueError(f"r={value} is not used by AdaLoRA; set init_r (and target_r) instead")
        return value

    @field_validator("init_r", "deltaT")
    @classmethod
    def _positive(cls, value: int, info: Any) -> int:
        return check_positive(value, info.field_name)

    @field_validator("target_r", "tinit", "tfinal")
    @classmethod
    def _non_negative(cls, value: int, info: Any) -> int:
        return check_positive(value, info.field_name, allow_zero=True)

    @field_validator("lora_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        return check_probability(value, "lora_dropout")

    @field_validator("beta1", "beta2")
    @classmethod
    def _beta(cls, value: float, info: Any) -> float:
        if not 0 < value < 1:
            raise ValueError(f"{info.field_name} must be in (0, 1), got {value}")
        return value

    @field_validator("orth_reg_weight")
    @classmethod
    def _orth(cls, value: float) -> float:
        return check_positive(value, "orth_reg_weight", allow_zero=True)

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: str) -> str:
        return check_bias(value, "lora_only")

    @model_validator(mode="after")
    def _schedule(self) -> Self:
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(
                f"total_step must be set to the run's number of optimiser steps (> 0), got {self.total_step}"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no budgeting phase: "
                "need tinit < total_step - tfinal"
            )
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} must not exceed init_r={self.init_r}")
        return self
