"""LoKr: low-rank Kronecker-product adaptation (LyCORIS)."""

from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.lokr.module import LoKr
from peftkit.methods.registry import register_method

register_method(LoKrConfig, LoKr)

__all__ = ["LoKr", "LoKrConfig"]
