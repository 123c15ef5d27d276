"""peftkit: one frozen language model, many small experts.

Drop-in for Hugging Face PEFT's public API: change ``from peft import ...`` to
``from peftkit import ...``. Every name in ``peft.__all__`` (PEFT 0.21) resolves here; names of
PEFT methods peftkit does not ship import fine and raise a clear error when used
(see ``docs/peft-compatibility.md``).
"""

# First, before anything imports torch: OpenMP reads its settings when it loads (peftkit/runtime.py).
from peftkit import runtime  # noqa: F401

# isort: split

from peftkit.compat import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PLACEHOLDERS,
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    MultitaskPromptTuningInit,
    NoMatchingPeftModuleError,
    PeftError,
    PeftMixedModel,
    PeftWarning,
    UnsupportedMethodError,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_config,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
    set_peft_model_state_dict,
    shift_tokens_right,
)
from peftkit.compat.functions import PEFT_TYPE_TO_TUNER_MAPPING_ALL as PEFT_TYPE_TO_TUNER_MAPPING
from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig, PeftType, TaskType
from peftkit.methods.adalora import AdaLora, AdaLoraConfig
from peftkit.methods.boft import BOFT, BOFTConfig
from peftkit.methods.ia3 import IA3, IA3Config
from peftkit.methods.loha import LoHa, LoHaConfig
from peftkit.methods.lokr import LoKr, LoKrConfig
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.methods.oft import OFT, OFTConfig
from peftkit.methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuning, PromptTuningConfig, PromptTuningInit
from peftkit.methods.soft_prompt import PromptLearningConfig
from peftkit.methods.vera import Vera, VeraConfig
from peftkit.models import BASE_ADAPTER_NAME, PeftModel, get_peft_model, load_base, load_tokenizer
from peftkit.models.status import get_layer_status, get_model_status
from peftkit.models.task_models import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from peftkit.models.tuner_model import (
    AdaLoraModel,
    BOFTModel,
    IA3Model,
    LoHaModel,
    LoKrModel,
    LoraModel,
    OFTModel,
    VeraModel,
)

#: PEFT's names for the soft-prompt modules (peftkit's classes; built with ``create``, see the docs).
PromptEmbedding = PromptTuning
PrefixEncoder = PrefixTuning

# PEFT's names for methods peftkit does not ship: they import, and raise when used.
globals().update(PLACEHOLDERS)

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "BOFT",
    "CONFIG_NAME",
    "IA3",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "OFT",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "WEIGHTS_NAME",
    "AdaLora",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BOFTConfig",
    "BOFTModel",
    "IA3Config",
    "IA3Model",
    "LoHa",
    "LoHaConfig",
    "LoHaModel",
    "LoKr",
    "LoKrConfig",
    "LoKrModel",
    "Lora",
    "LoraConfig",
    "LoraModel",
    "MultitaskPromptTuningInit",
    "NoMatchingPeftModuleError",
    "OFTConfig",
    "OFTModel",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixEncoder",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuning",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "UnsupportedMethodError",
    "Vera",
    "VeraConfig",
    "VeraModel",
    "__version__",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_base",
    "load_peft_weights",
    "load_tokenizer",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
    *sorted(PLACEHOLDERS),
]
