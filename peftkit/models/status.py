"""``get_layer_status`` / ``get_model_status``: where every adapter sits and in what state (PEFT's API).

One :class:`TunerLayerStatus` per wrapped layer (targets and ``modules_to_save`` copies), summarised
by :class:`TunerModelStatus`; a value that differs between layers reads ``"irregular"``. The fields
and their meaning are PEFT's; ``module_type`` names peftkit's wrapper (``AdaptedLayer``) rather than a
per-method layer class, because one wrapper serves every method.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from peftkit.methods.tuners.layer import AdaptedLayer

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _agree(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_parameters(layer: AdaptedLayer) -> dict[str, list[nn.Parameter]]:
    """Adapter name → its parameters on ``layer`` (every slot but the base layer)."""
    found: dict[str, list[nn.Parameter]] = collections.defaultdict(list)
    for slot, container in layer.named_children():
        if slot == "base_layer" or not isinstance(container, nn.ModuleDict | nn.ParameterDict):
            continue
        for name, value in container.items():
            found[name].extend([value] if isinstance(value, nn.Parameter) else value.parameters())
    return found


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each adapted layer of ``model`` (a PeftModel, or a model with injected adapters)."""
    from peftkit.models.peft_model import PeftModel
    from peftkit.models.tuner_model import TunerModel

    if isinstance(model, PeftModel) and not isinstance(model.base_model, TunerModel):
        raise TypeError(
            "get_layer_status() got an invalid PeftModel instance; its first adapter is a soft prompt "
            "(soft prompts have no adapter layers)"
        )
    root = model.base_model if isinstance(model, PeftModel) else model
    statuses: list[TunerLayerStatus] = []
    for name, layer in root.named_modules():
        if not isinstance(layer, AdaptedLayer):
            continue
        routing = layer.routing
        params = _adapter_parameters(layer)
        statuses.append(
            TunerLayerStatus(
                name=name,
                module_type=type(layer).__name__,
                enabled=not (routing is not None and routing.disabled),
                active_adapters=list(routing.active) if routing is not None else [],
                merged_adapters=list(layer.merged),
                requires_grad={k: _agree([p.requires_grad for p in v]) for k, v in params.items() if v},
                available_adapters=sorted(layer.parts),
                devices={k: sorted({p.device.type for p in v}) for k, v in params.items() if v},
            )
        )
    if not statuses:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT "
            "adapters injected in the model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """A summary of :func:`get_layer_status` over the whole model (PEFT's fields)."""
    from transformers import PreTrainedModel

    from peftkit.models.peft_model import PeftModel

    if isinstance(model, PeftModel):
        get_layer_status(model)  # a PeftModel led by a soft prompt is refused, as in PEFT
        base_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
        adapter_type = type(model.base_model).__name__
    else:
        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peft_types, adapter_type = {}, "None"
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_any = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_any)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_any for s in layers):
        merged = "irregular"
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            grads[key].append(value)
        for key, value in status.devices.items():
            devices[key].update(value)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(v) for k, v in devices.items()},
    )
