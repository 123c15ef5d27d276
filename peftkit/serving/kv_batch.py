"""The running batch's attention state: one left-padded ``DynamicCache`` with per-row masks and positions.

Every row's cache is right-aligned; shorter rows are padded on the left (mask 0). A row with a
soft prompt holds its virtual tokens' keys/values first::

    row a (prompt expert, n=3):  [ .  .  v0 v1 v2 |  .  t0 t1 t2 | g0 g1 ]
    row b (base):                [ .  .  .  .  .  | t0 t1 t2 t3 | g0 g1 ]
    row c (prefix expert, n=2):  [ .  .  .  p0 p1 |  .  .  t0 t1 | g0 g1 ]   (. = masked column)

Positions are explicit per row and count only the row's own attended tokens (``0 .. n-1`` for the
virtual tokens, ``n ..`` for the rest), so each row computes what it computes alone; masked columns
in the middle are harmless because every query sees them masked. Rows join with
:meth:`KVBatch.concat` (the shorter side padded on the left) and leave with :meth:`KVBatch.select`
(``index_select``, then all-padding left columns are cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from peftkit.models.fast_linear import frozen_linear_on_onednn
from peftkit.serving.prefix_store import CachedPrefix


@dataclass
class KVBatch:
    """The cache of the running rows.

    Attributes:
        layers: per decoder layer ``(keys, values)``, each ``(B, H_kv, T, d_head)``.
        mask: ``(B, T)`` 1 where a column is one of the row's own positions.
        positions: ``(B,)`` the position id of each row's next token.
        tokens: ``(B,)`` each row's last chosen token (the next decoding step's input).
    """

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor
    positions: Tensor
    tokens: Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def concat(self, other: KVBatch) -> KVBatch:
        """``self``'s rows followed by ``other``'s; the shorter cache is padded on the left."""
        length = max(self.length, other.length)
        a, b = self._padded_to(length), other._padded_to(length)
        return KVBatch(
            layers=[
                (torch.cat([ka, kb]), torch.cat([va, vb]))
                for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True)
            ],
            mask=torch.cat([a.mask, b.mask]),
            positions=torch.cat([a.positions, b.positions]),
            tokens=torch.cat([a.tokens, b.tokens]),
        )

    def _padded_to(self, length: int) -> KVBatch:
        pad = length - self.length
        if pad == 0:
            return self
        return KVBatch(
            layers=[(F.pad(k, (0, 0, pad, 0)), F.pad(v, (0, 0, pad, 0))) for k, v in self.layers],
            mask=F.pad(self.mask, (pad, 0)),
            positions=self.positions,
            tokens=self.tokens,
        )

    def select(self, rows: Sequence[int]) -> KVBatch | None:
        """Keep ``rows`` (in that order) and cut the left columns none of them uses; ``None`` if empty."""
        if not rows:
            return None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.ne(0).any(0)
        start = int(used.int().argmax()) if bool(used.any()) else mask.shape[1]
        return KVBatch(
            layers=[(_rows(k, index, start), _rows(v, index, start)) for k, v in self.layers],
            mask=mask[:, start:],
            positions=self.positions.index_select(0, index),
            tokens=self.tokens.index_select(0, index),
        )

    @torch.no_grad()
    def decode(self, model: nn.Module, routing: AbstractContextManager | None = None) -> Tensor:
        """One decoding step for every row: feed :attr:`tokens`; returns ``(B, V)`` next-token logits."""
        cache = cache_of(self.layers, model.config)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        embeds = model.get_input_embeddings()(self.tokens.unsqueeze(1))  # (B, 1, D)
        with routing or nullcontext(), frozen_linear_on_onednn(embeds):  # oneDNN from 16 rows on
            out = model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=self.positions.unsqueeze(1),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.mask = mask
        self.positions = self.positions + 1
        return out.logits[:, -1, :]


@torch.no_grad()
def prefill(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    prefixes: Sequence[CachedPrefix | None],
    routing: AbstractContextManager | None = None,
    pad_token_id: int = 0,
) -> tuple[KVBatch, Tensor]:
    """Encode new rows' own tokens over their cached prefixes, in one batched forward.

    Row ``i``'s tokens get positions ``n_i .. n_i + L_i - 1`` (``n_i`` its virtual tokens). Both the
    prefix block (``P = max n_i`` columns) and the token block (``L = max L_i``) are left-padded.

    Returns:
        the rows' :class:`KVBatch` (``tokens`` not yet chosen: zeros) and their ``(B, V)`` logits
        at the last prompt token.
    """
    if len(prompts) != len(prefixes):
        raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    param = next(model.parameters())
    device = param.device
    batch = len(prompts)
    counts = [0 if p is None else p.num_virtual_tokens for p in prefixes]
    virtual, length = max(counts), max(len(p) for p in prompts)

    ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    token_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        token_mask[i, length - len(prompt) :] = 1
    prefix_mask = torch.zeros(batch, virtual, dtype=torch.long)
    for i, n in enumerate(counts):
        prefix_mask[i, virtual - n :] = 1
    ids, token_mask, prefix_mask = ids.to(device), token_mask.to(device), prefix_mask.to(device)
    offset = torch.tensor(counts, dtype=torch.long, device=device).unsqueeze(1)
    position_ids = offset + (token_mask.cumsum(1) - 1).clamp_min(0)  # (B, L)

    cache = cache_of(_padded_prefix(prefixes, counts, virtual) if virtual else [], model.config)
    mask = torch.cat([prefix_mask, token_mask], dim=1)  # (B, P + L)
    embeds = model.get_input_embeddings()(ids)
    with routing or nullcontext(), frozen_linear_on_onednn(embeds):
        out = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    state = KVBatch(
        layers=[(layer.keys, layer.values) for layer in cache.layers],
        mask=mask,
        positions=position_ids[:, -1] + 1,
        tokens=torch.zeros(batch, dtype=torch.long, device=device),
    )
    return state, out.logits[:, -1, :]


def _rows(states: Tensor, index: Tensor, start: int) -> Tensor:
    """``(B', H_kv, T - start, d)``: rows ``index`` of ``(B, H_kv, T, d)`` states from column ``start``."""
    return states.index_select(0, index)[:, :, start:]


def _padded_prefix(
    prefixes: Sequence[CachedPrefix | None], counts: list[int], virtual: int
) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(B, H_kv, P, d)`` keys and values, each row's prefix right-aligned, zeros elsewhere."""
    template = next(p for p in prefixes if p is not None).key_values
    layers = []
    for layer, (k0, v0) in enumerate(template):
        keys = k0.new_zeros(len(prefixes), k0.shape[1], virtual, k0.shape[3])
        values = v0.new_zeros(len(prefixes), v0.shape[1], virtual, v0.shape[3])
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                k, v = prefix.key_values[layer]
                keys[i, :, virtual - counts[i] :] = k[0]
                values[i, :, virtual - counts[i] :] = v[0]
        layers.append((keys, values))
    return layers


def cache_of(layers: Sequence[tuple[Tensor, Tensor]], model_config: object) -> DynamicCache:
    """A ``DynamicCache`` holding ``layers`` as they are (no copy: the next update concatenates)."""
    cache = DynamicCache(config=model_config)
    if layers and len(layers) != len(cache.layers):
        raise ValueError(f"{len(layers)} cached layers for a model with {len(cache.layers)}")
    for layer, (keys, values) in zip(cache.layers, layers, strict=False):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"{type(layer).__name__} caches (sliding-window attention) are not supported")
        layer.keys, layer.values, layer.device, layer.is_initialized = keys, values, keys.device, True
    return cache


def check_model_cache(model_config: object) -> None:
    """Raise unless every layer of the model's ``DynamicCache`` is a plain (full-attention) layer.

    A sliding window counts cache columns, and the left-padded batch has columns that are not the
    row's own: the window would be wrong for padded rows.
    """
    for layer in DynamicCache(config=model_config).layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"the serving engine needs full-attention layers; this model's cache has {type(layer).__name__}"
            )
