"""P-tuning (Liu et al., 2021)."""

from peftkit.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.p_tuning.module import PromptEncoder
from peftkit.methods.registry import register_method

register_method(PromptEncoderConfig, PromptEncoder)

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
