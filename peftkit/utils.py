"""The helpers PEFT users import from ``peft.utils`` (same names, same behaviour as in :mod:`peftkit`)."""

import torch

from peftkit.compat import (
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
    set_peft_model_state_dict,
    shift_tokens_right,
)
from peftkit.config import CONFIG_NAME, PeftType, TaskType
from peftkit.config import WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME


def infer_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]
