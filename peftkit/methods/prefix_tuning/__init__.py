"""Prefix tuning (Li & Liang, 2021)."""

from peftkit.methods.prefix_tuning.config import PrefixTuningConfig
from peftkit.methods.prefix_tuning.module import PrefixTuning
from peftkit.methods.registry import register_method

register_method(PrefixTuningConfig, PrefixTuning)

__all__ = ["PrefixTuning", "PrefixTuningConfig"]
