"""Attention caches that carry a key/value prefix (prefix tuning) into the base model.

Two kinds:

* :func:`readonly_prefix_cache` for forwards that keep no cache (training, scoring). Its layers
  return ``cat(prefix, new)`` without storing anything, so a layer recomputed by gradient
  checkpointing sees exactly what it saw the first time.
* :func:`growing_prefix_cache` for decoding: a regular ``DynamicCache`` seeded with the prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


class ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer that holds a fixed prefix and never grows."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def readonly_prefix_cache(prefix: list[tuple[Tensor, Tensor]]) -> Cache:
    """A cache presenting ``prefix`` (per layer ``(B, H_kv, P, d)`` keys, values) to every layer."""
    return Cache(layers=[ReadOnlyPrefixLayer(k, v) for k, v in prefix])


def growing_prefix_cache(prefix: list[tuple[Tensor, Tensor]] | None, model_config: Any) -> DynamicCache:
    """A ``DynamicCache`` for decoding, holding ``prefix`` first when there is one."""
    cache = DynamicCache(config=model_config)
    for layer_idx, (keys, values) in enumerate(prefix or []):
        cache.update(keys, values, layer_idx)
    return cache


@contextlib.contextmanager
def cache_survives_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep a read-only cache (transformers drops caches there by default).

    Safe only for :func:`readonly_prefix_cache`: recomputing a layer reads the same prefix again.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache
