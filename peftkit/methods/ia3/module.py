"""(IA)³ on Linear / GPT-2 Conv1D layers (https://arxiv.org/abs/2205.05638).

::

    attention target:     y = l ⊙ (W x + b)          ia3_l (out, 1)
    feed-forward target:  y = W (l ⊙ x) + b          ia3_l (1, in)

Several (IA)³ adapters on one row multiply, as in PEFT. Merging scales the weight's rows (and the
bias) or its columns; unmerging divides again, which needs every entry of ``l`` to be non-zero.
File key (PEFT): ``<path>.ia3_l``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.tuners.adapter import WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, dense_weight, rows_view, scale_rows
from peftkit.methods.tuners.targeting import default_targets


class IA3(WeightAdapter):
    """The (IA)³ adapter."""

    config: IA3Config
    default_targets_table = "ia3"

    def __init__(self, config: IA3Config, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.feedforward: dict[str, bool] = {}

    @classmethod
    def resolve_config(cls, base_model: nn.Module, config: IA3Config) -> IA3Config:
        if config.feedforward_modules is None:
            config = config.model_copy(
                update={"feedforward_modules": default_targets(base_model, "ia3_feedforward", "feedforward_modules")}
            )
        return super().resolve_config(base_model, config)

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex must match the whole path; a name matches the path's end."""
        names = self.config.feedforward_modules or []
        if isinstance(names, str):
            return re.fullmatch(names, path) is not None
        return any(path.endswith(name) for name in names)

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        out_features, in_features = dense_weight(module).shape
        feedforward = self.feedforward[path] = self.is_feedforward(path)
        shape = (1, in_features) if feedforward else (out_features, 1)
        vector = torch.ones(shape) if self.config.init_ia3_weights else torch.randn(shape)
        return {"ia3_l": nn.Parameter(vector)}

    # ------------------------------------------------------------------ maths
    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor:
        if not self.feedforward[layer.path]:
            return x
        vector = self.part(layer, "ia3_l").flatten()
        scaled = (x.to(vector.dtype) * vector).to(x.dtype)
        return scaled if rows is None else torch.where(rows_view(rows, x), scaled, x)

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        if self.feedforward[layer.path]:
            return y
        return scale_rows(y, rows, self.part(layer, "ia3_l").flatten())

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        return self._scaled(layer, self.part(layer, "ia3_l").detach().float())

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        vector = self.part(layer, "ia3_l").detach().float()
        if bool((vector == 0).any()):
            raise ValueError(f"cannot unmerge (IA)³ adapter {self.name!r} from {layer.path}: its vector has zeros")
        return self._scaled(layer, 1.0 / vector)

    def _scaled(self, layer: AdaptedLayer, factor: Tensor) -> dict[str, Tensor]:
        """Base weight (and, for output scaling, bias) multiplied by ``factor`` ``(out, 1)`` or ``(1, in)``."""
        tensors = {"weight": layer.stored_weight(layer.dense_weight().float() * factor)}
        bias = getattr(layer.base_layer, "bias", None)
        if not self.feedforward[layer.path] and bias is not None:
            tensors["bias"] = bias.float() * factor.flatten()
        return tensors
