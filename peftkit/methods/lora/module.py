"""LoRA on ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d``; DoRA on the linear ones.

::

    x ──► W (frozen) ───────────────────────────────┐
    │                                               + ──► y           LoRA:  y = W x + s · B A x
    └─► dropout ─► A (r × in) ─► B (out × r) ─► ·s ─┘                  s = alpha / r   (rsLoRA: alpha / √r)

DoRA (https://arxiv.org/abs/2402.09353) re-normalises the updated weight per output row and scales
it by a trained magnitude ``m`` ``(out,)``::

    y = m / ‖W + s·BA‖_row ⊙ (W x + s · B A x)        (the norm is treated as a constant, §4.3)

File keys and shapes (PEFT's), per layer type:

- Linear / Conv1D: ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)`` [+ ``.bias``]; update ``s · B A x``.
- Embedding ``(num, dim)``: ``lora_embedding_A (r, num)``, ``lora_embedding_B (dim, r)``; update
  ``s · B A[:, ids]`` (times the layer's ``embed_scale``, e.g. Gemma's).
- ConvNd: ``lora_A.weight (r, in, *kernel)`` with the base stride and padding, ``lora_B.weight (out, r, 1, ...)``
  [+ ``.bias``]; update ``s · B(A(x))``.

DoRA adds ``<path>.lora_magnitude_vector (out,)``. An embedding's ``A`` starts at zero and ``B`` normal (the
embedding counterpart of "``B`` starts at zero"), as in PEFT and the LoRA reference code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.init import is_residual, orthogonal_init, residual_init
from peftkit.methods.lora.replication import replicate_layers
from peftkit.methods.lora.tokens import TokenDelta, tied_heads, token_layers
from peftkit.methods.lora.tying import apply_weight_tying
from peftkit.methods.tuners.adapter import PREFIX, WeightAdapter
from peftkit.methods.tuners.layer import AdaptedLayer, base_of, cast_input, dense_weight
from peftkit.methods.tuners.targeting import LINEAR_TYPES, pattern_value

CONV_TYPES = (nn.Conv1d, nn.Conv2d)


class Lora(WeightAdapter):
    """The LoRA / DoRA adapter (one object for all the layers it adapts)."""

    config: LoraConfig
    bias_only = "lora_only"
    supported_types: ClassVar[tuple[type[nn.Module], ...]] = (*LINEAR_TYPES, nn.Embedding, *CONV_TYPES)

    def __init__(self, config: LoraConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.scaling: dict[str, float] = {}
        self._dora_norms: dict[str, Tensor] = {}
        #: ``trainable_token_indices``: layer path → its trained rows; tied heads share the embedding's.
        self.token_paths: dict[str, TokenDelta] = {}
        self.tied_token_paths: set[str] = set()
        #: ``ensure_weight_tying``: output head path → the embedding whose LoRA factors it uses, transposed.
        self.tied_lora: dict[str, str] = {}

    @classmethod
    def create(cls, base_model: nn.Module, config: LoraConfig, adapter_name: str = "default", **context: Any) -> Lora:
        if config.layer_replication:  # before targeting: the copies get adapters of their own
            replicate_layers(base_model, config.layer_replication)
        adapter = super().create(base_model, config, adapter_name, **context)
        if config.trainable_token_indices is not None:
            adapter.add_token_parts(base_model)
        apply_weight_tying(adapter, base_model)
        return adapter

    def add_token_parts(self, base_model: nn.Module) -> None:
        """The ``token_adapter`` parts of ``trainable_token_indices`` (see :mod:`peftkit.methods.lora.tokens`)."""
        layers = token_layers(base_model, self.config.trainable_token_indices)
        tied: dict[str, str] = {}  # head → embedding
        for path in list(layers):
            for head in tied_heads(base_model, path):
                if head in layers and layers[head] != layers[path]:
                    if self.config.ensure_weight_tying:
                        raise ValueError(
                            f"ensure_weight_tying=True but trainable_token_indices gives the tied layers {path!r} and "
                            f"{head!r} different indices ({layers[path]} and {layers[head]})"
                        )
                    continue  # two independent sets of rows on one shared weight, as PEFT does
                layers.pop(head, None)
                tied[head] = path
        for path in [*layers, *tied]:
            if path in self.parts or path in self.saved:
                raise ValueError(
                    f"trainable_token_indices: {path!r} is also in target_modules or modules_to_save; "
                    "train the layer one way only"
                )
        for path, indices in layers.items():
            delta = TokenDelta(base_of(base_model.get_submodule(path)).weight, indices)
            self.parts[path] = {"token_adapter": delta}
            self.token_paths[path] = delta
        for head, path in tied.items():
            self.parts[head] = {"token_adapter": self.token_paths[path]}
            self.token_paths[head] = self.token_paths[path]
            self.tied_token_paths.add(head)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for param in super().adapter_parameters():
            if id(param) not in seen:  # a tied head shares the embedding's trained rows
                seen.add(id(param))
                yield param

    def named_tensors(self) -> dict[str, Tensor]:
        tensors = super().named_tensors()
        heads = tuple(f"{PREFIX}{head}." for head in self.tied_token_paths)
        tensors = {k: v for k, v in tensors.items() if not (heads and k.startswith(heads))}
        for head, embedding in self.tied_lora.items():  # written as PEFT writes them: the transposed factors
            a, b = self.parts[embedding]["lora_embedding_A"], self.parts[embedding]["lora_embedding_B"]
            tensors[f"{PREFIX}{head}.lora_A.weight"] = b.t()
            tensors[f"{PREFIX}{head}.lora_B.weight"] = a.t()
        return tensors

    def merge(self, safe_merge: bool = False) -> None:
        if self.config.layer_replication:
            raise ValueError(
                "cannot merge a LoRA adapter with layer_replication: the replicated layers share their base weights, "
                "so a merge would put every copy's update into all of them"
            )
        super().merge(safe_merge)

    def build_parts(self, path: str, module: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        config = self.config
        r = pattern_value(config.rank_pattern, path, config.r)
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        self.scaling[path] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        if not isinstance(module, LINEAR_TYPES):
            for flag in ("use_dora", "lora_bias") if isinstance(module, nn.Embedding) else ("use_dora",):
                if getattr(config, flag):
                    raise ValueError(f"{flag}=True is not supported on {type(module).__name__} layers ({path})")
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if isinstance(module, nn.Embedding):
            return self._embedding_parts(module, r) | {"lora_dropout": dropout}
        if isinstance(module, CONV_TYPES):
            return self._conv_parts(path, module, r) | {"lora_dropout": dropout}
        weight = dense_weight(module)
        out_features, in_features = weight.shape
        # Created in PEFT's order (A, then B with its default init), so a seed gives PEFT's tensors.
        down = nn.Linear(in_features, r, bias=False)
        up = nn.Linear(r, out_features, bias=config.lora_bias)
        init = config.init_lora_weights
        with torch.no_grad():
            if is_residual(init):
                a, b, residual = residual_init(init, weight, r, self.scaling[path])
                down.weight.data, up.weight.data = a, b
                stored = residual.t() if isinstance(module, Conv1D) else residual
                module.weight.data = stored.to(module.weight.dtype).contiguous()
            elif init == "orthogonal":
                a, b = orthogonal_init(r, in_features, out_features)
                down.weight.data, up.weight.data = a.to(weight.dtype), b.to(weight.dtype)
            elif init is not False:
                self._reset(down, up, r)
        parts: dict[str, nn.Module | nn.Parameter] = {"lora_A": down, "lora_B": up, "lora_dropout": dropout}
        if config.use_dora:
            with torch.no_grad():
                update = (up.weight @ down.weight) * self.scaling[path]
                weight = dense_weight(module)  # after a residual init: the residual
                magnitude = torch.linalg.norm(weight.float() + update.to(weight.device), dim=1)
            parts["lora_magnitude_vector"] = nn.Parameter(magnitude)
        return parts

    def _reset(self, down: nn.Module, up: nn.Module, r: int) -> None:
        """``True``: ``A`` as ``nn.Linear`` initialises (Kaiming-uniform, as the LoRA reference code); ``"gaussian"``:
        ``A`` normal with std ``1/r``. ``B`` starts at zero, so the adapter starts as the base model."""
        if self.config.init_lora_weights == "gaussian":
            nn.init.normal_(down.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        if up.bias is not None:
            nn.init.zeros_(up.bias)

    def _embedding_parts(self, module: nn.Embedding, r: int) -> dict[str, nn.Module | nn.Parameter]:
        a = nn.Parameter(torch.randn(r, module.num_embeddings))
        b = nn.Parameter(torch.randn(module.embedding_dim, r))
        if self.config.init_lora_weights is not False:  # every other option: PEFT's embedding init
            with torch.no_grad():
                nn.init.zeros_(a)
                nn.init.normal_(b)
        return {"lora_embedding_A": a, "lora_embedding_B": b}

    def _conv_parts(self, path: str, module: nn.Conv1d | nn.Conv2d, r: int) -> dict[str, nn.Module | nn.Parameter]:
        odd = {"groups": (module.groups, 1), "padding_mode": (module.padding_mode, "zeros")}
        odd["dilation"] = (module.dilation, (1,) * len(module.kernel_size))
        bad = {k: v for k, (v, default) in odd.items() if v != default}
        if bad:
            raise ValueError(
                f"LoRA on {type(module).__name__} {path!r} supports only the defaults of {sorted(bad)}; got {bad}"
            )
        init = self.config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={init!r} works on linear layers only; {path!r} is a {type(module).__name__}"
            )
        conv = type(module)
        ones = (1,) * len(module.kernel_size)
        down = conv(module.in_channels, r, module.kernel_size, module.stride, module.padding, bias=False)
        up = conv(r, module.out_channels, ones, ones, bias=self.config.lora_bias)
        if init is not False:
            with torch.no_grad():
                self._reset(down, up, r)
        return {"lora_A": down, "lora_B": up}

    # ------------------------------------------------------------------ maths
    def lora_weight(self, layer: AdaptedLayer) -> Tensor:
        """``s · B A`` laid out as :meth:`AdaptedLayer.dense_weight`: ``(out, in)`` for linear layers,
        ``(num, dim)`` for an embedding, ``(out, in, *kernel)`` for a convolution."""
        scaling = self.scaling[layer.path]
        base = layer.base_layer
        if layer.path in self.tied_lora:  # ΔW_head = s · A_embᵀ B_embᵀ (tying.py)
            a, b = self._tied_factors(layer)
            return (b.float() @ a.float()) * scaling
        if isinstance(base, nn.Embedding):
            a, b = self.part(layer, "lora_embedding_A"), self.part(layer, "lora_embedding_B")
            return (b.float() @ a.float()).t() * scaling
        down, up = self.part(layer, "lora_A"), self.part(layer, "lora_B")
        if isinstance(base, CONV_TYPES):  # B is 1×1: (out, r) @ (r, in·k...)
            a = down.weight.float()
            update = up.weight.float().flatten(1) @ a.flatten(1)
            return update.view(up.weight.shape[0], *a.shape[1:]) * scaling
        return (up.weight.float() @ down.weight.float()) * scaling

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        tokens = self.token_paths.get(layer.path)
        if tokens is None:
            return super().transform_output(layer, x, y, rows, args, kwargs)
        if rows is None:
            return tokens(layer.base_layer, x).to(y.dtype)
        index = rows.nonzero().squeeze(1)
        return y.index_copy(0, index, tokens(layer.base_layer, x.index_select(0, index)).to(y.dtype))

    def delta(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        base = layer.base_layer
        if isinstance(base, nn.Embedding):
            return self._embedding_delta(layer, x)
        if layer.path in self.tied_lora:
            a, b = self._tied_factors(layer)
            x = self.part(layer, "lora_dropout")(cast_input(x, a.dtype))
            return (x @ a.t() @ b.t()) * self.scaling[layer.path]
        down, up = self.part(layer, "lora_A"), self.part(layer, "lora_B")
        x = self.part(layer, "lora_dropout")(cast_input(x, down.weight.dtype))
        update = up(down(x)) * self.scaling[layer.path]
        if not self.config.use_dora:
            return update
        weight = layer.dense_weight().to(x.dtype)
        scale = self.dora_scale(layer, weight)
        return (scale - 1) * F.linear(x, weight) + scale * update

    def _tied_factors(self, layer: AdaptedLayer) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of a head tied to the embedding: ``(B_embᵀ, A_embᵀ)``, the embedding's own parameters."""
        parts = self.parts[self.tied_lora[layer.path]]
        return parts["lora_embedding_B"].t(), parts["lora_embedding_A"].t()

    def _embedding_delta(self, layer: AdaptedLayer, ids: Tensor) -> Tensor:
        """``(..., dim)`` ``s · B A[:, ids]``, times the layer's ``embed_scale`` when it has one (Gemma)."""
        base = layer.base_layer
        a, b = self.part(layer, "lora_embedding_A"), self.part(layer, "lora_embedding_B")
        after_a = F.embedding(
            ids, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        update = (after_a @ b.t()) * self.scaling[layer.path]
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            update = update * torch.as_tensor(scale).to(update.dtype)
        return update

    def dora_scale(self, layer: AdaptedLayer, weight: Tensor) -> Tensor:
        """``(out,)`` ``m / ‖W + s·BA‖_row``, the norm detached from the graph (DoRA §4.3)."""
        magnitude = self.part(layer, "lora_magnitude_vector")
        norm = torch.linalg.norm(weight + self.lora_weight(layer).detach().to(weight.dtype), dim=1).detach()
        return magnitude / norm

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.lora_weight(layer)

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        tokens = self.token_paths.get(layer.path)
        if tokens is not None:
            return {"weight": tokens.weight_with_rows(layer.base_layer.weight.detach())}
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
        tokens = self.token_paths.get(layer.path)
        if tokens is not None:
            return {"weight": tokens.weight_with_rows(layer.base_layer.weight.detach(), tokens.original)}
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
