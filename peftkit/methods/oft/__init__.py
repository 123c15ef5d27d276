"""OFT: orthogonal fine-tuning (Qiu et al., 2023)."""

from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.module import OFT
from peftkit.methods.registry import register_method

register_method(OFTConfig, OFT)

__all__ = ["OFT", "OFTConfig"]
