"""LoRA (Hu et al., 2021), with rsLoRA scaling and DoRA (``use_dora=True``)."""

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.module import Lora
from peftkit.methods.registry import register_method

register_method(LoraConfig, Lora)

__all__ = ["Lora", "LoraConfig"]
