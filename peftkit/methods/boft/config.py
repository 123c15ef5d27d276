"""Configuration of BOFT (Liu et al., 2024, https://arxiv.org/abs/2311.06243). Field names and
defaults are PEFT's ``BOFTConfig``."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import field_validator, model_validator

from peftkit.methods.tuners.config import LayeredTunerConfig, check_bias, check_positive, check_probability


class BOFTConfig(LayeredTunerConfig):
    """BOFT: orthogonal fine-tuning with butterfly-factorised rotations, ``y = s ⊙ (W (x M)) + b``.

    ``M`` is the product of ``boft_n_butterfly_factor`` permuted block-diagonal orthogonal matrices and
    ``s`` ``(out,)`` a learned scale. Give exactly one of ``boft_block_size`` and ``boft_block_num``.
    Trainable parameters per adapted layer: ``factors · blocks · size² + out``.
    """

    peft_type: Literal["BOFT"] = "BOFT"
    boft_block_size: int = 4
    """Size of each orthogonal block (``0``: derived from ``boft_block_num``)."""
    boft_block_num: int = 0
    """Number of orthogonal blocks (``0``: derived from ``boft_block_size``)."""
    boft_n_butterfly_factor: int = 1
    """Number of butterfly factors (1 = plain block-diagonal OFT). PEFT without its CUDA extension
    silently uses 1 whatever this says; peftkit implements the factors (see docs/weight-adapters.md)."""
    boft_dropout: float = 0.0
    """Training only: fraction of blocks replaced by the identity (multiplicative dropout), in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``); resolved from the layers."""
    bias: str = "none"
    """Which base-model biases train: ``"none"``, ``"all"`` or ``"boft_only"``."""
    init_weights: bool = True
    """``True``: identity rotations and unit scale (the base model); ``False``: random (for tests)."""

    @field_validator("boft_block_size", "boft_block_num")
    @classmethod
    def _non_negative(cls, value: int, info) -> int:
        return check_positive(value, info.field_name, allow_zero=True)

    @field_validator("boft_n_butterfly_factor")
    @classmethod
    def _factors(cls, value: int) -> int:
        return check_positive(value, "boft_n_butterfly_factor")

    @field_validator("boft_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        return check_probability(value, "boft_dropout")

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: str) -> str:
        return check_bias(value, "boft_only")

    @model_validator(mode="after")
    def _one_of_size_and_num(self) -> Self:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                f"give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) as non-zero: boft_block_size × boft_block_num == in_features fixes the other"
            )
        return self
