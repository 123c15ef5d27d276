"""Configuration of LoHa (Hyeon-Woo et al., 2022, FedPara, https://arxiv.org/abs/2108.06098).
Field names and defaults are PEFT's ``LoHaConfig``."""

from __future__ import annotations

from typing import Literal

from peftkit.methods.tuners.lycoris import LycorisConfig


class LoHaConfig(LycorisConfig):
    """LoHa: ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)``, a Hadamard product of two rank-``r`` products.

    Trainable parameters per adapted layer: ``2 · r · (in + out)``.
    """

    peft_type: Literal["LOHA"] = "LOHA"
    init_weights: bool = True
    """``True``: ``W2b`` starts at zero (the base model); ``False``: every factor random (for tests)."""
