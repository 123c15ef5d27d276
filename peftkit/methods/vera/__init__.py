"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024)."""

from peftkit.methods.registry import register_method
from peftkit.methods.vera.config import VeraConfig
from peftkit.methods.vera.module import Vera

register_method(VeraConfig, Vera)

__all__ = ["Vera", "VeraConfig"]
