"""The wrapper placed around every layer a weight adapter targets.

::

    x ──► part₁.transform_input ─► ... ──► base layer ──► part₁.transform_output ─► ... ──► y
          (IA³ feed-forward, OFT:            (frozen)        (LoRA: y + BAx·s on the rows it serves,
           scale or rotate the input)                        IA³: y·l, BOFT: rotated weight, ...)

One :class:`AdaptedLayer` holds any number of adapters, keyed by adapter name as in PEFT
(``q_proj.lora_A["default"]``), so a state dict maps to PEFT's file keys by dropping the adapter
name. Which adapters act on which rows comes from the model's :class:`~peftkit.models.peft_model.Routing`:

- inside ``PeftModel.forward`` / ``generate``: the per-row map of that call, so one batch may mix
  adapters (rows an adapter does not serve get exactly the base output from it);
- outside (the base model called directly): the model's active adapters on every row, as in PEFT,
  and none inside ``disable_adapter()``.

Merged adapters already live in the base weights, so the layer skips them; a call that asks for
anything else than "every row uses every merged adapter" raises instead of computing a wrong result.
GPT-2's ``Conv1D`` stores its weight transposed ``(in, out)``; :meth:`AdaptedLayer.dense_weight`
always presents ``(out, in)``, so methods never see PEFT's ``fan_in_fan_out``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from peftkit.models.peft_model import Routing


class LayerPart(Protocol):
    """What one adapter does on one wrapped layer. ``rows`` is ``None`` (every row) or ``(B,)`` bool."""

    def transform_input(self, layer: AdaptedLayer, x: Tensor, rows: Tensor | None) -> Tensor: ...

    def transform_output(
        self, layer: AdaptedLayer, x: Tensor, y: Tensor, rows: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor: ...

    def merged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        """New values for the base layer's parameters (by name, stored layout) with this part merged in."""
        ...

    def unmerged_tensors(self, layer: AdaptedLayer) -> dict[str, Tensor]:
        """The base layer's parameter values with this (most recently merged) part taken out again."""
        ...


class AdaptedLayer(nn.Module):
    """A frozen base layer plus the adapter parts placed on it.

    Args:
        base_layer: the original module (``nn.Linear``, GPT-2 ``Conv1D``, or any module kept whole by
            ``modules_to_save``).
        routing: the owning model's routing table (read on every call).
        path: where the layer sits in the base model (adapters key per-layer settings by it).
    """

    def __init__(self, base_layer: nn.Module, routing: Routing | None, path: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.path = path
        self.parts: dict[str, LayerPart] = {}
        self.merged: list[str] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ------------------------------------------------------------------ geometry
    @property
    def transposed(self) -> bool:
        """True for GPT-2's ``Conv1D``, whose weight is stored ``(in, out)``."""
        return isinstance(self.base_layer, Conv1D)

    @property
    def in_features(self) -> int:
        return self.dense_weight().shape[1]

    @property
    def out_features(self) -> int:
        return self.dense_weight().shape[0]

    def dense_weight(self) -> Tensor:
        """``(out, in)`` the base weight as ``F.linear`` uses it (a view, never a copy)."""
        return dense_weight(self.base_layer)

    def stored_weight(self, dense: Tensor) -> Tensor:
        """``dense`` ``(out, in)`` laid out as the base layer stores its weight."""
        return (dense.t() if self.transposed else dense).contiguous()

    # ------------------------------------------------------------------ parts
    def add_part(self, slot: str, adapter_name: str, value: nn.Module | nn.Parameter) -> None:
        """Register ``value`` as ``self.<slot>[adapter_name]`` (a ModuleDict or ParameterDict)."""
        container = self._modules.get(slot)
        if container is None:
            container = nn.ParameterDict() if isinstance(value, nn.Parameter) else nn.ModuleDict()
            self.add_module(slot, container)
        container[adapter_name] = value

    def remove_parts(self, adapter_name: str) -> None:
        for slot in list(self._modules):
            container = self._modules[slot]
            if slot != "base_layer" and isinstance(container, nn.ModuleDict | nn.ParameterDict):
                if adapter_name in container:
                    del container[adapter_name]
                if len(container) == 0:
                    delattr(self, slot)
        self.parts.pop(adapter_name, None)
        if adapter_name in self.merged:
            self.merged.remove(adapter_name)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        selection = self.routing.selection() if self.routing is not None else {}
        for name in self.merged:
            if name not in selection or selection[name] is not None:
                raise RuntimeError(
                    f"adapter {name!r} is merged into the weights of {type(self.base_layer).__name__}, so every row "
                    "must use it; call unmerge_adapter() before disabling it or mixing adapters per row"
                )
        plan = [(part, selection[n]) for n, part in self.parts.items() if n in selection and n not in self.merged]
        if not plan:
            return self.base_layer(x, *args, **kwargs)
        for _, rows in plan:
            if rows is not None and rows.shape[0] != x.shape[0]:
                raise ValueError(f"routing covers {rows.shape[0]} rows but the layer input has {x.shape[0]}")
        h = x
        for part, rows in plan:
            h = part.transform_input(self, h, rows)
        y = self.base_layer(h, *args, **kwargs)
        for part, rows in plan:
            y = part.transform_output(self, x, y, rows, args, kwargs)
        return y

    # ------------------------------------------------------------------ merging
    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        """Fold ``adapter_name`` into the base weights; ``safe_merge`` refuses non-finite results."""
        if adapter_name not in self.merged:
            self.commit_merge(adapter_name, self.plan_merge(adapter_name, safe_merge))

    def plan_merge(self, adapter_name: str, safe_merge: bool = False) -> dict[str, Tensor]:
        """The new base tensors with ``adapter_name`` merged, checked for NaN/inf when ``safe_merge``."""
        tensors = self.parts[adapter_name].merged_tensors(self)
        if safe_merge:
            for key, value in tensors.items():
                if not torch.isfinite(value).all():
                    raise ValueError(
                        f"merging adapter {adapter_name!r} would put NaN/inf into {key!r} of {self.path or 'a layer'}; "
                        "the adapter's weights are broken (nothing was merged)"
                    )
        return tensors

    def commit_merge(self, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        self._assign(tensors)
        self.merged.append(adapter_name)

    def unmerge(self, adapter_name: str) -> None:
        """Take ``adapter_name`` out of the base weights (adapters come out in reverse merge order)."""
        if adapter_name not in self.merged:
            return
        if self.merged[-1] != adapter_name:
            raise RuntimeError(f"unmerge {self.merged[-1]!r} before {adapter_name!r} (merges are undone in reverse)")
        self._assign(self.parts[adapter_name].unmerged_tensors(self))
        self.merged.pop()

    def _assign(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for key, value in tensors.items():
                param = self.base_layer.get_parameter(key)
                param.data = value.to(param.dtype).contiguous()


def dense_weight(module: nn.Module) -> Tensor:
    """``(out, in)`` weight of a Linear or GPT-2 ``Conv1D`` (stored ``(in, out)``), as a view."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def base_of(module: nn.Module) -> nn.Module:
    """The original module, whether or not it is wrapped."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def rows_view(rows: Tensor, like: Tensor) -> Tensor:
    """``(B, 1, ..., 1)`` bool mask broadcastable to ``like``."""
    return rows.view(-1, *([1] * (like.dim() - 1)))


def add_to_rows(y: Tensor, rows: Tensor | None, delta: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``y + delta(x)`` on the selected rows only (every row when ``rows`` is None).

    The delta is computed only for the selected rows; the sum is taken in the wider of the two
    dtypes and cast back to ``y``'s (as PEFT does for float32 adapters on a bfloat16 model).
    """
    if rows is None:
        return (y + delta(x)).to(y.dtype)
    index = rows.nonzero().squeeze(1)
    d = delta(x.index_select(0, index))
    wide = torch.promote_types(y.dtype, d.dtype)
    return y.to(wide).index_add(0, index, d.to(wide)).to(y.dtype)


def scale_rows(y: Tensor, rows: Tensor | None, scale: Tensor) -> Tensor:
    """``y * scale`` on the selected rows (``scale`` broadcasts over the last dimension)."""
    scaled = (y * scale).to(y.dtype)
    return scaled if rows is None else torch.where(rows_view(rows, y), scaled, y)


def cast_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def wrap(model: nn.Module, path: str, routing: Routing | None) -> AdaptedLayer:
    """The :class:`AdaptedLayer` at ``path``, created around the module there if needed."""
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module, routing, path)
    _replace(model, path, layer)
    return layer


def unwrap(model: nn.Module, path: str) -> None:
    """Put the base layer back at ``path`` (its weights as they are now, merged adapters included)."""
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        _replace(model, path, module.base_layer)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
