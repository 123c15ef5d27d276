"""``trainable_token_indices``: train the embedding rows of a few tokens (new special tokens, say) next to a
LoRA, instead of the whole embedding matrix (PEFT's trainable tokens).

The adapter holds the new rows, ``trainable_tokens_delta`` ``(n, dim)``, initialised to the current rows, and
the layer computes with ``W'`` = ``W`` with rows ``indices`` replaced::

    embedding:     y = W'[ids] (· embed_scale)          output head:  y = W' h

When the output head shares its weight with the input embedding (GPT-2, Gemma), the head uses the same rows
(one tensor, saved once under the embedding's key), as PEFT ties them.

File key: ``base_model.model.<embedding path>.token_adapter.trainable_tokens_delta``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.methods.tuners.layer import base_of


class TokenDelta(nn.Module):
    """The trained rows of one embedding matrix (the ``token_adapter`` slot)."""

    def __init__(self, weight: Tensor, indices: list[int]) -> None:
        super().__init__()
        if len(set(indices)) != len(indices) or not all(0 <= i < weight.shape[0] for i in indices):
            raise ValueError(
                f"trainable_token_indices must be distinct token ids in [0, {weight.shape[0]}), got {indices}"
            )
        self.indices = list(indices)
        original = weight.detach()[indices].clone()
        self.register_buffer("original", original, persistent=False)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.trainable_tokens_delta = nn.Parameter(original.to(dtype).clone())

    def weight_with_rows(self, weight: Tensor, rows: Tensor | None = None) -> Tensor:
        """``weight`` ``(vocab, dim)`` with the trained rows in (or ``rows``, e.g. the originals)."""
        index = torch.tensor(self.indices, device=weight.device)
        values = self.trainable_tokens_delta if rows is None else rows
        return weight.index_copy(0, index, values.to(weight.dtype))

    def forward(self, base: nn.Module, x: Tensor) -> Tensor:
        weight = self.weight_with_rows(base.weight)
        if isinstance(base, nn.Embedding):
            y = F.embedding(
                x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )
            scale = getattr(base, "embed_scale", None)
            return y if scale is None else y * torch.as_tensor(scale).to(y.dtype)
        return F.linear(x, weight, base.bias)


def token_layers(model: nn.Module, spec: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """Module path → token indices: a list targets the input embedding; a dict names the layers (path or tail)."""
    paths = dict(model.named_modules())
    if not isinstance(spec, dict):
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next(
            (n for n, m in paths.items() if m is embedding or (embedding is not None and m is base_of(embedding))), None
        )
        name = name.removesuffix(".base_layer") if name else None
        if name is None:
            raise ValueError(
                "trainable_token_indices is a list but the model has no get_input_embeddings(); "
                "name the layer in a dict"
            )
        return {name: list(spec)}
    found: dict[str, list[int]] = {}
    for key, indices in spec.items():
        hits = [p for p in paths if (p == key or p.endswith(f".{key}")) and ".base_layer" not in p]
        if len(hits) != 1:
            raise ValueError(
                f"trainable_token_indices names {key!r}, which matches {hits or 'no module'}; name one layer"
            )
        module = base_of(paths[hits[0]])
        if not isinstance(module, nn.Embedding | nn.Linear):
            raise ValueError(
                f"trainable_token_indices: {hits[0]!r} is a {type(module).__name__}, not an Embedding or Linear"
            )
        found[hits[0]] = list(indices)
    return found


def tied_heads(model: nn.Module, embedding_path: str) -> list[str]:
    """Paths of other modules whose weight *is* the embedding's (the tied output head)."""
    weight = base_of(model.get_submodule(embedding_path)).weight
    heads = []
    for name, module in model.named_modules():
        own = name and name != embedding_path and "base_layer" not in name
        if own and getattr(base_of(module), "weight", None) is weight and isinstance(base_of(module), nn.Linear):
            heads.append(name)
    return heads
