"""Base-model loading and the adapter-carrying model wrapper."""

from peftkit.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotAvailableError,
    load_base,
    load_tokenizer,
)
from peftkit.models.peft_model import BASE_ADAPTER_NAME, PeftModel, get_peft_model

__all__ = [
    "BASE_ADAPTER_NAME",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ModelNotAvailableError",
    "PeftModel",
    "get_peft_model",
    "load_base",
    "load_tokenizer",
]
