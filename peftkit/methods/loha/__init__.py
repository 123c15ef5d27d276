"""LoHa: low-rank Hadamard-product adaptation (FedPara; LyCORIS)."""

from peftkit.methods.loha.config import LoHaConfig
from peftkit.methods.loha.module import LoHa
from peftkit.methods.registry import register_method

register_method(LoHaConfig, LoHa)

__all__ = ["LoHa", "LoHaConfig"]
