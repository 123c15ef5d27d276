"""LoRA and DoRA on Linear / GPT-2 Conv1D layers.

::

    x ──► W (frozen) ───────────────────────────────┐
    │                                               + ──► y           LoRA:  y = W x + s · B A x
    └─► dropout ─► A (r × in) ─► B (out × r) ─► ·s ─┘                  s = alpha / r   (rsLoRA: alpha / √r)

DoRA (https://arxiv.org/abs/2402.09353) re-normalises the updated weight per output row and scales
it by a trained magnitude ``m`` ``(out,)``::

    y = m / ‖W + s·BA‖_row ⊙ (W x + s · B A x)        (the norm is treated as a constant, §4.3)

File keys (PEFT): ``<path>.lora_A.weight (r, in)``, ``<path>.lora_B.weight (out, r)`` [+ ``.lora_B.bias``],
``<path>.lora_magnitude_vector (out,)`` for DoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, cast_input, dense_weight
from peftkit.methods.tuners.targeting import pattern_value


class Lora(WeightAdapter):
    """The LoRA / DoRA adapter (one object for all the layers it adapts)."""

    config: LoraConfig
    bias_only = "lora_only"

    def __init__(self, config: LoraConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.scaling: dict[str, float] = {}
        self._dora_norms: dict[str, Tensor] = {}

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        config = self.config
        weight = dense_weight(module)
        out_features, in_features = weight.shape
        r = pattern_value(config.rank_pattern, path, config.r)
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        self.scaling[path] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        down = nn.Linear(in_features, r, bias=False)
        up = nn.Linear(r, out_features, bias=config.lora_bias)
        if config.init_lora_weights is not False:
            if config.init_lora_weights == "gaussian":
                nn.init.normal_(down.weight, std=1 / r)
            else:  # as nn.Linear initialises, following the LoRA reference code
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            if up.bias is not None:
                nn.init.zeros_(up.bias)
        parts: dict[str, nn.Module | nn.Parameter] = {
            "lora_A": down,
            "lora_B": up,
            "lora_dropout": nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity(),
        }
        if config.use_dora:
            with torch.no_grad():
                update = (up.weight @ down.weight) * self.scaling[path]
                magnitude = torch.linalg.norm(weight.float() + update.to(weight.device), dim=1)
            parts["lora_magnitude_vector"] = nn.Parameter(magnitude)
        return parts

    # ------------------------------------------------------------------ maths
    def lora_weight(self, layer: AdaptedLayer) -> Tensor:
        """``(out, in)`` ``s · B A``."""
        down, up = self.part(layer, "lora_A"), self.part(layer, "lora_B")
        return (up.weight.float() @ down.weight.float()) * self.scaling[layer.path]

    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        down, up = self.part(layer, "lora_A"), self.part(layer, "lora_B")
        x = self.part(layer, "lora_dropout")(cast_input(x, down.weight.dtype))
        update = up(down(x)) * self.scaling[layer.path]
        if not self.config.use_dora:
            return update
        weight = layer.dense_weight().to(x.dtype)
        scale = self.dora_scale(layer, weight)
        return (scale - 1) * F.linear(x, weight) + scale * update

    def dora_scale(self, layer: AdaptedLayer, weight: Tensor) -> Tensor:
        """``(out,)`` ``m / ‖W + s·BA‖_row``, the norm detached from the graph (DoRA §4.3)."""
        magnitude = self.part(layer, "lora_magnitude_vector")
        norm = torch.linalg.norm(weight + self.lora_weight(layer).detach().to(weight.dtype), dim=1).detach()
        return magnitude / norm

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.lora_weight(layer)

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = layer.dense_weight().float()
        update = self.lora_weight(layer)
        if self.config.use_dora:
            norm = torch.linalg.norm(weight + update, dim=1).detach()
            self._dora_norms[layer.path] = norm
            factor = (self.part(layer, "lora_magnitude_vector").float() / norm).unsqueeze(1)
            tensors = {"weight": layer.stored_weight(factor * (weight + update))}
        else:
            tensors = {"weight": layer.stored_weight(weight + update)}
        return tensors | self._bias_tensors(layer, sign=1.0)

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        weight = layer.dense_weight().float()
        update = self.lora_weight(layer)
        if self.config.use_dora:
            norm = self._dora_norms.pop(layer.path)
            factor = (self.part(layer, "lora_magnitude_vector").float() / norm).unsqueeze(1)
            tensors = {"weight": layer.stored_weight(weight / factor - update)}
        else:
            tensors = {"weight": layer.stored_weight(weight - update)}
        return tensors | self._bias_tensors(layer, sign=-1.0)

    def _bias_tensors(self, layer: AdaptedLayer, sign: float) -> dict[str, Tensor]:
        if not self.config.lora_bias:
            return {}
        if getattr(layer.base_layer, "bias", None) is None:
            raise RuntimeError(f"cannot merge lora_bias into {layer.path}: the base layer has no bias")
        extra = self.part(layer, "lora_B").bias.float() * self.scaling[layer.path]
        return {"bias": layer.base_layer.bias.float() + sign * extra}
