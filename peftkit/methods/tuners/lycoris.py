"""What LoHa and LoKr share (both come from the LyCORIS family): a full-size weight update built from
small factors, scaled by ``alpha / r``, with rank dropout and module dropout during training.

::

    y = W x + ΔW x,   ΔW = (alpha / r) · build(factors)      (LoHa: Hadamard product, LoKr: Kronecker)

Rank dropout zeroes random output rows of ``ΔW``; module dropout skips the adapter for a whole call.
Both only act in training mode, as in PEFT.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.config import LayeredTunerConfig, check_positive, check_probability
from peftkit.methods.tuners.layer import AdaptedLayer, add_to_rows, cast_input
from peftkit.methods.tuners.targeting import pattern_value


class LycorisConfig(LayeredTunerConfig):
    """Fields LoHa and LoKr share (PEFT's ``LycorisConfig``)."""

    unsupported_defaults: ClassVar[dict[str, Any]] = {"use_effective_conv2d": False}

    r: int = 8
    """Rank of the factors; > 0."""
    alpha: int | float = 8
    """The update is scaled by ``alpha / r``."""
    rank_dropout: float = 0.0
    """Training only: probability of dropping each output row of the update, in [0, 1)."""
    module_dropout: float = 0.0
    """Training only: probability of skipping the adapter for a whole call, in [0, 1)."""
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module rank overriding ``r``: ``{regex of the path's tail: rank}``."""
    alpha_pattern: dict[str, int | float] = Field(default_factory=dict)
    """Per-module alpha overriding ``alpha``: ``{regex of the path's tail: alpha}``."""

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        return check_positive(value, "r")

    @field_validator("rank_dropout", "module_dropout")
    @classmethod
    def _dropout(cls, value: float, info: Any) -> float:
        return check_probability(value, info.field_name)


class LycorisAdapter(WeightAdapter):
    """Additive adapter whose update is a full ``(out, in)`` matrix built from factors."""

    config: LycorisConfig
    #: Whether rank dropout rescales the kept rows by 1 / keep-rate (LoHa always does; LoKr on request).
    rescale_rank_dropout: ClassVar[bool] = True

    def __init__(self, config: LycorisConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.scaling: dict[str, float] = {}

    def rank_and_scaling(self, path: str) -> int:
        """The rank for ``path`` (``rank_pattern`` or ``r``); records ``alpha / r`` for it."""
        r = pattern_value(self.config.rank_pattern, path, self.config.r)
        self.scaling[path] = pattern_value(self.config.alpha_pattern, path, self.config.alpha) / r
        return r

    def factors_weight(self, layer: AdaptedLayer) -> Tensor:
        """``(out, in)`` the update before scaling."""
        raise NotImplementedError

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.factors_weight(layer).float() * self.scaling[layer.path]

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        if layer.training and self.config.module_dropout and torch.rand(1).item() <= self.config.module_dropout:
            return y
        return add_to_rows(y, rows, lambda xs: self.delta(layer, xs), x)

    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        weight = self.factors_weight(layer) * self.scaling[layer.path]
        if layer.training and self.config.rank_dropout:
            keep = (torch.rand(weight.shape[0], device=weight.device) > self.config.rank_dropout).to(weight.dtype)
            if self.rescale_rank_dropout or getattr(self.config, "rank_dropout_scale", False):
                keep = keep / keep.mean().clamp_min(1e-12)
            weight = weight * keep.unsqueeze(1)
        return F.linear(cast_input(x, weight.dtype), weight)
