"""Configuration of LoKr (Yeh et al., 2023, LyCORIS, https://arxiv.org/abs/2309.14859).
Field names and defaults are PEFT's ``LoKrConfig``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from peftkit.methods.tuners.lycoris import LycorisConfig


class LoKrConfig(LycorisConfig):
    """LoKr: ``ΔW = (alpha / r) · W1 ⊗ W2`` (Kronecker product), ``in`` and ``out`` each factored in two.

    With ``in = m·n`` and ``out = l·k`` (factors near the square root, or ``decompose_factor``):
    ``W1`` is ``(l, m)`` and ``W2`` is ``(k, n)``. ``W2`` becomes ``W2a W2b`` (rank ``r``) when
    ``r < max(k, n) / 2``; ``W1`` likewise only with ``decompose_both``.
    """

    peft_type: Literal["LOKR"] = "LOKR"
    decompose_both: bool = False
    """Also split ``W1`` into a rank-``r`` product (when ``r < max(l, m) / 2``)."""
    decompose_factor: int = -1
    """Preferred size of the first factor of ``in`` and ``out`` (``-1``: closest to the square root)."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank dropout by 1 / keep-rate."""
    init_weights: bool | Literal["lycoris"] = True
    """``True``: ``W1`` starts at zero (the base model); ``"lycoris"``: ``W2`` starts at zero;
    ``False``: every factor random (for tests)."""

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"decompose_factor must be -1 (automatic) or > 0, got {value}")
        return value

    @field_validator("init_weights", mode="before")
    @classmethod
    def _init(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value == "lycoris"):
            raise ValueError(f"init_weights={value!r} is not supported; use True, False or 'lycoris'")
        return value
