"""PEFT's module-level helpers and mappings that peftkit implements."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkit.compat.unsupported import PLACEHOLDERS, UNSUPPORTED_METHODS
from peftkit.config import PeftConfig, PeftType
from peftkit.methods.registry import config_class_for
from peftkit.models.peft_model import PeftModel
from peftkit.models.tuner_model import PEFT_TYPE_TO_TUNER_MAPPING, TunerModel


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config class that ``config_dict["peft_type"]`` names, built from the dict."""
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> nn.Module:
    """Place a weight adapter inside ``model``'s layers and return ``model`` itself (no wrapper).

    The adapter is active; calling ``model`` computes the adapted output. Soft prompts change the
    model's inputs, so they need a :class:`~peftkit.PeftModel` (as in PEFT, which refuses them too).
    """
    if peft_config.is_prompt_learning:
        raise ValueError("inject_adapter_in_model does not support prompt learning methods; use get_peft_model")
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type, TunerModel)
    tuner = tuner_cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
    # The adapters live in model's layers; the PeftModel that owns them stays reachable from the model.
    object.__setattr__(model, "_peftkit_model", tuner._peft_model)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """PEFT's preparation for training on a frozen base: freeze every parameter, cast fp16/bf16 ones to fp32.

    peftkit loads no k-bit quantized models, so (as PEFT does for a model that is not quantized) gradient
    checkpointing is not switched on here; use ``PeftModel.gradient_checkpointing_enable``.
    """
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        raise NotImplementedError("k-bit quantized models (bitsandbytes) are not supported by peftkit")
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype``, trainable ones to fp32 (for mixed-precision training)."""
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


def shift_tokens_right(input_ids: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Shift ids one position right, starting with ``decoder_start_token_id`` (-100 becomes ``pad_token_id``)."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    if pad_token_id is None:
        raise ValueError("pad_token_id has to be defined.")
    return shifted.masked_fill(shifted == -100, pad_token_id)


class PeftMixedModel(PeftModel):
    """PEFT's model for mixing adapter types: every peftkit ``PeftModel`` mixes them already.

    ``set_adapter([...])`` activates several adapters (of any methods) at once.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__(model, peft_config, adapter_name)


def _config_or_placeholder(peft_type: str) -> Any:
    if peft_type in UNSUPPORTED_METHODS:
        return PLACEHOLDERS[UNSUPPORTED_METHODS[peft_type][0]]
    return config_class_for(peft_type)


def _tuner_or_placeholder(peft_type: str) -> Any:
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
    names = UNSUPPORTED_METHODS.get(peft_type, ())
    return PLACEHOLDERS[names[1]] if len(names) > 1 else None


_PROMPT_TYPES = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"}

#: ``peft_type`` → config class (placeholders for the methods peftkit does not ship).
PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, Any] = {t.value: _config_or_placeholder(t.value) for t in PeftType}
#: ``peft_type`` → tuner-model class, for PEFT's tuner methods (prompt methods have none).
PEFT_TYPE_TO_TUNER_MAPPING_ALL: dict[str, Any] = {
    t.value: _tuner_or_placeholder(t.value) for t in PeftType if t.value not in _PROMPT_TYPES
}
#: ``peft_type`` → tuner class, for the methods PEFT's ``PeftMixedModel`` can mix.
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: dict[str, Any] = {
    t: PEFT_TYPE_TO_TUNER_MAPPING_ALL[t]
    for t in ("LORA", "ADALORA", "BEFT", "HIRA", "IA3", "LOHA", "LOKR", "SHIRA", "ROAD")
}
#: PEFT's per-architecture prefix-cache post-processing (empty in PEFT too: transformers handles it).
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict[str, Any] = {}
