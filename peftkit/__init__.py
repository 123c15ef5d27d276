"""peftkit: one frozen language model, many small experts.

Drop-in for Hugging Face PEFT's public API: change ``from peft import ...`` to
``from peftkit import ...``.
"""

# First, before anything imports torch: OpenMP reads its settings when it loads (peftkit/runtime.py).
from peftkit import runtime  # noqa: F401

# isort: split

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

PeftModelForCausalLM = PeftModel

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "BOFT",
    "CONFIG_NAME",
    "IA3",
    "OFT",
    "WEIGHTS_NAME",
    "AdaLora",
    "AdaLoraConfig",
    "BOFTConfig",
    "IA3Config",
    "LoHa",
    "LoHaConfig",
    "LoKr",
    "LoKrConfig",
    "Lora",
    "LoraConfig",
    "OFTConfig",
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
    "Vera",
    "VeraConfig",
    "__version__",
    "get_peft_model",
    "load_base",
    "load_tokenizer",
]
