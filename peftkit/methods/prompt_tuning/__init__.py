"""Prompt tuning (Lester et al., 2021)."""

from peftkit.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftkit.methods.prompt_tuning.module import PromptTuning
from peftkit.methods.registry import register_method

register_method(PromptTuningConfig, PromptTuning)

__all__ = ["PromptTuning", "PromptTuningConfig", "PromptTuningInit"]
