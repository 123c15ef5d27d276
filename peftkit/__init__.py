"""peftkit: one frozen language model, many small experts.

Drop-in for Hugging Face PEFT's public API: change ``from peft import ...`` to
``from peftkit import ...``.
"""

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig, PeftType, TaskType
from peftkit.methods.lora import Lora, LoraConfig
from peftkit.methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuning, PromptTuningConfig, PromptTuningInit
from peftkit.methods.soft_prompt import PromptLearningConfig
from peftkit.models import BASE_ADAPTER_NAME, PeftModel, get_peft_model, load_base, load_tokenizer

PeftModelForCausalLM = PeftModel

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Lora",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftType",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuning",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "__version__",
    "get_peft_model",
    "load_base",
    "load_tokenizer",
]
