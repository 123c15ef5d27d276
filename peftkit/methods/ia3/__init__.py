"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022)."""

from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.ia3.module import IA3
from peftkit.methods.registry import register_method

register_method(IA3Config, IA3)

__all__ = ["IA3", "IA3Config"]
