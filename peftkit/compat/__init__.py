"""Hugging Face PEFT's public names that live outside peftkit's own packages.

- :mod:`~peftkit.compat.functions`: helpers and mappings peftkit implements (``inject_adapter_in_model``,
  ``prepare_model_for_kbit_training``, ``PeftMixedModel``, ``PEFT_TYPE_TO_CONFIG_MAPPING``, ...);
- :mod:`~peftkit.compat.state_dict`: ``get_peft_model_state_dict`` and its relatives;
- :mod:`~peftkit.compat.auto`: ``AutoPeftModel...``;
- :mod:`~peftkit.compat.unsupported`: names of PEFT methods peftkit does not ship; they import, and
  using one raises an error naming it and the shipped methods.

``tests/interop/test_import_surface.py`` checks that every name in ``peft.__all__`` resolves here.
"""

from peftkit.compat import unsupported
from peftkit.compat.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peftkit.compat.functions import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING_ALL,
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    PeftMixedModel,
    cast_mixed_precision_params,
    get_peft_config,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    shift_tokens_right,
)
from peftkit.compat.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.compat.unsupported import PLACEHOLDERS, MultitaskPromptTuningInit, UnsupportedMethodError
from peftkit.errors import NoMatchingPeftModuleError, PeftError, PeftWarning

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING_ALL",
    "PLACEHOLDERS",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "MultitaskPromptTuningInit",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftMixedModel",
    "PeftWarning",
    "UnsupportedMethodError",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_config",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    "unsupported",
]
