"""LoKr on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2309.14859).

::

    in = m·n, out = l·k                     (factorization(): the split closest to √dim)
    ΔW = (alpha / r) · W1 ⊗ W2              W1 (l, m) or W1a (l, r) @ W1b (r, m)
                                            W2 (k, n) or W2a (k, r) @ W2b (r, n)
    y  = W x + ΔW x

File keys (PEFT): ``<path>.lokr_w1`` | ``lokr_w1_a``, ``lokr_w1_b``; ``<path>.lokr_w2`` | ``lokr_w2_a``,
``lokr_w2_b``. PEFT cannot wrap GPT-2's ``Conv1D`` with LoKr; peftkit can (such files load only here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.tuners.layer import AdaptedLayer, dense_weight
from peftkit.methods.tuners.lycoris import LycorisAdapter


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m <= n``, ``m·n = dimension`` (LyCORIS's rule, as PEFT).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``; otherwise the pair
    closest to the square root whose first part does not exceed ``factor`` (``-1``: no bound).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # fixed at the start, as in LyCORIS / PEFT
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > length or candidate > factor:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


class LoKr(LycorisAdapter):
    """The LoKr adapter."""

    config: LoKrConfig
    rescale_rank_dropout = False

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        config = self.config
        out_features, in_features = dense_weight(module).shape
        r = self.rank_and_scaling(path)
        in_m, in_n = factorization(in_features, config.decompose_factor)
        out_l, out_k = factorization(out_features, config.decompose_factor)
        parts: dict[str, nn.Module | nn.Parameter] = {}
        zero = "w1" if config.init_weights is True else ("w2" if config.init_weights == "lycoris" else None)
        for name, (rows, cols), full in (
            ("w1", (out_l, in_m), not (config.decompose_both and r < max(out_l, in_m) / 2)),
            ("w2", (out_k, in_n), not r < max(out_k, in_n) / 2),
        ):
            if full:
                parts[f"lokr_{name}"] = _param((rows, cols), zero=zero == name)
            else:  # the zero goes into the factor PEFT zeroes: w1_a for w1, w2_b for w2
                parts[f"lokr_{name}_a"] = _param((rows, r), zero=zero == name == "w1")
                parts[f"lokr_{name}_b"] = _param((r, cols), zero=zero == name == "w2")
        return parts

    def factor(self, layer: AdaptedLayer, name: str) -> Tensor:
        slots = getattr(layer, f"lokr_{name}", None)
        if slots is not None and self.name in slots:
            return slots[self.name]
        return self.part(layer, f"lokr_{name}_a") @ self.part(layer, f"lokr_{name}_b")

    def factors_weight(self, layer: AdaptedLayer) -> Tensor:
        return torch.kron(self.factor(layer, "w1"), self.factor(layer, "w2").contiguous())


def _param(shape: tuple[int, int], zero: bool) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape))
    if zero:
        nn.init.zeros_(param)
    else:
        nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    return param
