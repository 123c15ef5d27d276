"""``layer_replication``: grow a model by repeating decoder layers that share their frozen weights, each copy
with its own LoRA (the mergekit "passthrough" layout; PEFT's ``layer_replication``).

``[[0, 4], [2, 5]]`` on layers ``[0, 1, 2, 3, 4]`` gives ``[0, 1, 2, 3, 2, 3, 4]``: each ``[start, end)``
range is appended in order. The copies share every base parameter with their original (no extra memory),
so only the adapters tell them apart; merging is refused, since a merge into a shared weight would change
every copy. The change to the base model is permanent (``unload()`` keeps the longer model), as in PEFT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

#: Attribute recording the map applied to a model, so a second adapter with the same map does not grow it again.
APPLIED = "_peftkit_layer_replication"


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> None:
    """Rebuild the decoder-layer list of ``model`` following ``layer_map`` (in place).

    The list is found as PEFT finds it: ``model(.model)*.layers`` (Llama-like), ``.bert.encoder.layer`` or
    ``.encoder.layer`` (BERT-like), or ``.h`` (Falcon-like).
    """
    wanted = [list(pair) for pair in layer_map]
    applied = getattr(model, APPLIED, None)
    if applied is not None:
        if applied != wanted:
            raise ValueError(
                f"this base model's layers were already replicated with layer_replication={applied}; "
                f"an adapter with layer_replication={wanted} cannot be added to it"
            )
        return
    owner, attribute = _layer_list(model)
    layers = getattr(owner, attribute)
    for start, end in wanted:
        if not 0 <= start < end <= len(layers):
            raise ValueError(f"layer_replication range [{start}, {end}) is outside the {len(layers)} layers")
    copies: list[nn.Module] = []
    for start, end in wanted:
        for index in range(start, end):
            clone = _shared_clone(layers[index])
            for module in clone.modules():  # the attention cache is indexed by layer position
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(copies)
            copies.append(clone)
    setattr(owner, attribute, nn.ModuleList(copies))
    config = getattr(owner, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(copies)
    setattr(model, APPLIED, wanted)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    inner = model
    while hasattr(inner, "model"):
        inner = inner.model
    if hasattr(inner, "bert"):
        inner = inner.bert
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner, "layers"
    encoder = getattr(inner, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder, "layer"
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, "h"
    raise ValueError(
        "layer_replication needs a decoder-layer list at model(.model)*.layers, .encoder.layer or .h "
        f"(Llama, BERT or Falcon layouts, as in PEFT); {type(model).__name__} has none"
    )


def _shared_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's (the same tensors)."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for pname, param in sub.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone
