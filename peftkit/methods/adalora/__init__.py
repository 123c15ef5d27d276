"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al., 2023)."""

from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.module import AdaLora
from peftkit.methods.adalora.rank_allocator import RankAllocator, budget_schedule
from peftkit.methods.registry import register_method

register_method(AdaLoraConfig, AdaLora)

__all__ = ["AdaLora", "AdaLoraConfig", "RankAllocator", "budget_schedule"]
