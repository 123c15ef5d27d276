"""Configuration of LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685), rsLoRA
(Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732) and DoRA (Liu et al., 2024,
https://arxiv.org/abs/2402.09353). Field names and defaults are PEFT's ``LoraConfig``."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from peftkit.methods.lora.init import NEEDS_MORE
from peftkit.methods.tuners.config import LayeredTunerConfig, check_bias, check_positive, check_probability

#: PEFT ``LoraConfig`` fields peftkit does not implement, with the only value accepted in a file.
LORA_UNSUPPORTED: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "target_parameters": None,
    "use_bdlora": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "ensure_weight_tying": False,
    "arrow_config": None,
    "kasa_config": None,
}

#: Of those, the ones LoRA implements (AdaLoRA, which shares the list, does not).
LORA_IMPLEMENTED = ("trainable_token_indices", "layer_replication", "ensure_weight_tying")

LORA_INITS = (True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "orthogonal")


class LoraConfig(LayeredTunerConfig):
    """LoRA: ``W x + (alpha / r) · B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` trained.

    Trainable parameters per adapted layer: ``r · (in + out)`` (+ ``out`` with ``lora_bias``,
    + ``out`` with ``use_dora``).
    """

    unsupported_defaults: ClassVar[dict[str, Any]] = {
        k: v for k, v in LORA_UNSUPPORTED.items() if k not in LORA_IMPLEMENTED
    }

    peft_type: Literal["LORA"] = "LORA"
    r: int = 8
    """Rank of the update; > 0. May exceed a layer's dimensions (the update is then full rank)."""
    lora_alpha: int | float = 8
    """Scale numerator: the update is multiplied by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the targets store weights ``(in, out)`` (GPT-2's ``Conv1D``). peftkit reads the layout
    from the layer type and writes the resolved value, as PEFT does."""
    bias: str = "none"
    """Which base-model biases train and are saved: ``"none"``, ``"all"`` or ``"lora_only"`` (the adapted
    layers' biases). Trained biases change the base output, also under ``disable_adapter()``."""
    use_rslora: bool = False
    """rsLoRA: scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``."""
    init_lora_weights: bool | str = True
    """``True``: ``A`` Kaiming-uniform, ``B`` zero (starts as the base model); ``"gaussian"``: ``A`` normal
    with std ``1/r``, ``B`` zero; ``False``: both random (for tests: the adapter changes the output);
    ``"pissa"`` / ``"pissa_niter_K"`` / ``"olora"``: the top of the base weight's spectrum moves into the adapter
    and the base weight keeps the residual (loading such an adapter redoes this on the base model it is loaded
    onto); ``"orthogonal"``: random orthogonal factors, even ``r`` (see :mod:`peftkit.methods.lora.init`).
    ``"loftq"``, ``"eva"`` and ``"corda"`` need quantisation or calibration data and are refused."""
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module rank overriding ``r``: ``{regex of the path's tail: rank}``."""
    alpha_pattern: dict[str, int | float] = Field(default_factory=dict)
    """Per-module alpha overriding ``lora_alpha``: ``{regex of the path's tail: alpha}``."""
    use_dora: bool = False
    """DoRA: split the adapted weight into a trained per-output magnitude and a LoRA-updated direction."""
    lora_bias: bool = False
    """Give ``B`` a trained bias (merging then needs the base layer to have a bias)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose embedding rows train beside the LoRA: a list (the input embedding) or
    ``{layer name: ids}``. A tied output head uses the same rows. See :mod:`peftkit.methods.lora.tokens`."""
    ensure_weight_tying: bool = False
    """Keep tied layers tied: with ``trainable_token_indices``, tied layers given different ids are an error
    (otherwise each gets its own rows, as in PEFT)."""
    layer_replication: list[list[int]] | None = None
    """Grow the model by repeating decoder layers, ``[[start, end), ...]`` (``[[0, 4], [2, 5]]``: layers
    ``0 1 2 3 2 3 4``). Copies share the frozen weights and each gets its own LoRA; merging is then refused.
    See :mod:`peftkit.methods.lora.replication`."""

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        return check_positive(value, "r")

    @field_validator("lora_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        return check_probability(value, "lora_dropout")

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: str) -> str:
        return check_bias(value, "lora_only")

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("gaussian", "olora"):  # PEFT compares these two case-insensitively
                return lowered
            if value in ("pissa", "orthogonal") or re.fullmatch(r"pissa_niter_\d+", value):
                return value
            if value in NEEDS_MORE:
                raise ValueError(f"init_lora_weights={value!r} is not supported by peftkit: {NEEDS_MORE[value]}")
        raise ValueError(
            f"init_lora_weights={value!r} is not supported; use one of {list(LORA_INITS)} "
            "(K a number of subspace iterations)"
        )

    @field_validator("layer_replication", mode="before")
    @classmethod
    def _layer_map(cls, value: Any) -> Any:
        if value is None:
            return None
        pairs = [list(pair) for pair in value] if isinstance(value, list | tuple) else None
        if not pairs or any(len(p) != 2 or not all(isinstance(i, int) for i in p) or p[0] >= p[1] for p in pairs):
            raise ValueError(
                f"layer_replication must be a list of [start, end) layer ranges with start < end, got {value!r}"
            )
        return pairs

    @field_validator("rank_pattern")
    @classmethod
    def _pattern_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v <= 0}
        if bad:
            raise ValueError(f"rank_pattern ranks must be > 0, got {bad}")
        return value
