"""BOFT: orthogonal fine-tuning with butterfly factorisation (Liu et al., 2024)."""

from peftkit.methods.boft.config import BOFTConfig
from peftkit.methods.boft.module import BOFT
from peftkit.methods.registry import register_method

register_method(BOFTConfig, BOFT)

__all__ = ["BOFT", "BOFTConfig"]
