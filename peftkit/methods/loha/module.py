"""LoHa on Linear / GPT-2 Conv1D layers (FedPara, https://arxiv.org/abs/2108.06098).

::

    ΔW = (alpha / r) · (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)      each product (out, in)
    y  = W x + ΔW x

The Hadamard product of two rank-``r`` matrices can reach rank ``r²`` at the cost of ``2r(in+out)``
parameters. File keys (PEFT): ``<path>.hada_w1_a (out, r)``, ``hada_w1_b (r, in)``, ``hada_w2_a``,
``hada_w2_b``. PEFT cannot wrap GPT-2's ``Conv1D`` with LoHa; peftkit can (such files load only here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftkit.methods.loha.config import LoHaConfig
from peftkit.methods.tuners.layer import AdaptedLayer, dense_weight
from peftkit.methods.tuners.lycoris import LycorisAdapter


class LoHa(LycorisAdapter):
    """The LoHa adapter."""

    config: LoHaConfig

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        out_features, in_features = dense_weight(module).shape
        r = self.rank_and_scaling(path)
        shapes = {
            "hada_w1_a": (out_features, r),
            "hada_w1_b": (r, in_features),
            "hada_w2_a": (out_features, r),
            "hada_w2_b": (r, in_features),
        }
        parts = {name: nn.Parameter(torch.empty(shape)) for name, shape in shapes.items()}
        for name, param in parts.items():
            if name == "hada_w2_b" and self.config.init_weights:
                nn.init.zeros_(param)  # one zero factor: the adapter starts as the identity
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        return parts

    def factors_weight(self, layer: AdaptedLayer) -> Tensor:
        w1 = self.part(layer, "hada_w1_a") @ self.part(layer, "hada_w1_b")
        w2 = self.part(layer, "hada_w2_a") @ self.part(layer, "hada_w2_b")
        return w1 * w2
