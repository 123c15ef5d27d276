"""Configuration of OFT (Qiu et al., 2023, https://arxiv.org/abs/2306.07280; PEFT's current
parametrisation, Qiu et al., 2025, https://arxiv.org/abs/2506.19847). Field names and defaults are
PEFT's ``OFTConfig``."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import field_validator, model_validator

from peftkit.methods.tuners.config import LayeredTunerConfig, check_bias, check_positive, check_probability

CAYLEY_NEUMANN_SINCE = "0.18.0"


def _older(version: str, than: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.partition("@")[0].split(".")[:3] if p.isdigit())

    return parts(version) < parts(than)


class OFTConfig(LayeredTunerConfig):
    """OFT: rotate each layer's input by a learned block-diagonal orthogonal matrix, ``y = W (R x) + b``.

    Give exactly one of ``r`` (number of blocks) and ``oft_block_size``; the other follows from
    ``in_features = r · oft_block_size``. Trainable parameters per adapted layer:
    ``r · b(b-1)/2`` (``b(b-1)/2`` with ``block_share``), ``b`` the block size.
    """

    peft_type: Literal["OFT"] = "OFT"
    r: int = 0
    """Number of orthogonal blocks per layer (``0``: derived from ``oft_block_size``)."""
    oft_block_size: int = 32
    """Size of each orthogonal block (``0``: derived from ``r``). Adjusted, with a warning, to the nearest
    divisor of a layer's input size, as PEFT does."""
    module_dropout: float = 0.0
    """Training only: fraction of blocks replaced by the identity (multiplicative dropout), in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``); resolved from the layers."""
    bias: str = "none"
    """Which base-model biases train: ``"none"``, ``"all"`` or ``"oft_only"``."""
    init_weights: bool = True
    """``True``: identity rotations (the base model); ``False``: random (for tests)."""
    coft: bool = False
    """Constrained OFT: keep each block's skew-symmetric generator within ``eps`` of zero."""
    eps: float = 6e-5
    """COFT's bound on how far a rotation may move (scaled by 1/√blocks)."""
    block_share: bool = False
    """One rotation block shared by all blocks of a layer."""
    use_cayley_neumann: bool = True
    """Approximate the Cayley transform ``(I - Q)(I + Q)^-1`` by its Neumann series (faster, as PEFT)."""
    num_cayley_neumann_terms: int = 5
    """Terms of the Neumann series."""

    @field_validator("r", "oft_block_size")
    @classmethod
    def _non_negative(cls, value: int, info) -> int:
        return check_positive(value, info.field_name, allow_zero=True)

    @field_validator("module_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        return check_probability(value, "module_dropout")

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: str) -> str:
        return check_bias(value, "oft_only")

    @field_validator("num_cayley_neumann_terms")
    @classmethod
    def _terms(cls, value: int) -> int:
        return check_positive(value, "num_cayley_neumann_terms")

    def to_dict(self) -> dict[str, Any]:
        """PEFT refuses OFT files without ``peft_version`` (it dates the Cayley-Neumann parametrisation);
        peftkit computes PEFT >= 0.18's, so it writes that version when none is recorded."""
        data = super().to_dict()
        if data.get("peft_version") is None:
            data["peft_version"] = CAYLEY_NEUMANN_SINCE
        return data

    @model_validator(mode="after")
    def _current_parametrisation(self) -> Self:
        if self.use_cayley_neumann and self.peft_version and _older(self.peft_version, CAYLEY_NEUMANN_SINCE):
            raise ValueError(
                f"this OFT adapter was written by PEFT {self.peft_version}, whose Cayley-Neumann parametrisation "
                f"changed in {CAYLEY_NEUMANN_SINCE}; peftkit computes the new one, so the file would load wrongly"
            )
        return self

    @model_validator(mode="after")
    def _one_of_r_and_block_size(self) -> Self:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) as non-zero: "
                "r × oft_block_size == in_features fixes the other"
            )
        return self
