"""VeRA on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2310.11454).

::

    vera_A (r, in_max), vera_B (out_max, r): frozen, drawn once from projection_prng_key, shared
    y = W x + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))        λ_b (out,), λ_d (r,) trained per layer

The projections are sized for the largest adapted layer and sliced per layer. They are buffers of one
module shared by every wrapped layer (so ``.to()`` moves them once and they never train).
File keys (PEFT): ``<path>.vera_lambda_b``, ``<path>.vera_lambda_d``, and with ``save_projection``
``base_model.vera_A`` / ``base_model.vera_B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, cast_input, dense_weight
from peftkit.methods.vera.config import VeraConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain √2, fan-in = ``shape[1]``) from ``generator``, as PEFT draws VeRA's projections."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen projections (non-persistent buffers: saved by the adapter under PEFT's keys)."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((out_max, r), generator), persistent=False)


class Vera(WeightAdapter):
    """The VeRA adapter."""

    config: VeraConfig
    bias_only = "vera_only"
    default_targets_table = "vera"

    def prepare(self, modules: dict[str, nn.Module]) -> None:
        shapes = [dense_weight(m).shape for m in modules.values()]
        out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
        self.projections = VeraProjections(self.config.r, in_max, out_max, self.config.projection_prng_key)

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        out_features = dense_weight(module).shape[0]
        r = self.config.r
        if self.config.init_weights:
            lambda_b, lambda_d = torch.zeros(out_features), torch.full((r,), self.config.d_initial)
        else:
            lambda_b, lambda_d = torch.ones(out_features), torch.randn(r)
        dropout = nn.Dropout(self.config.vera_dropout) if self.config.vera_dropout > 0 else nn.Identity()
        return {
            "vera_lambda_b": nn.Parameter(lambda_b),
            "vera_lambda_d": nn.Parameter(lambda_d),
            "vera_dropout": dropout,
            "vera_projection": self.projections,
        }

    def named_tensors(self) -> dict[str, Tensor]:
        tensors = super().named_tensors()
        if self.config.save_projection:
            tensors["base_model.vera_A"] = self.projections.vera_A
            tensors["base_model.vera_B"] = self.projections.vera_B
        return tensors

    # ------------------------------------------------------------------ maths
    def sliced(self, layer: AdaptedLayer) -> tuple[Tensor, Tensor]:
        """``A[:, :in]`` ``(r, in)`` and ``B[:out]`` ``(out, r)`` for this layer."""
        return self.projections.vera_A[:, : layer.in_features], self.projections.vera_B[: layer.out_features]

    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        lambda_b, lambda_d = self.part(layer, "vera_lambda_b"), self.part(layer, "vera_lambda_d")
        a, b = self.sliced(layer)
        x = self.part(layer, "vera_dropout")(cast_input(x, lambda_d.dtype))
        return lambda_b * F.linear(lambda_d * F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        lambda_b, lambda_d = self.part(layer, "vera_lambda_b"), self.part(layer, "vera_lambda_d")
        a, b = self.sliced(layer)
        return (lambda_b.float().unsqueeze(1) * b.float()) @ (lambda_d.float().unsqueeze(1) * a.float())
