"""An expert's virtual-token keys and values, computed once and reused by every request.

A soft prompt's keys and values depend only on the expert and the frozen weights (with a LoRA
underneath, on the pair), never on the user's tokens: the virtual tokens come first and attention
is causal. So they are computed once per expert version and each request's prefill runs only its
own tokens, at positions ``n .. n + L - 1``, over the cached prefix::

    prompt tuning:  embeddings (n, D) ──frozen model, positions 0..n-1──► per layer (K, V) (1, H_kv, n, d)
    prefix tuning:  key_values per layer (H_kv, n, d)                  ──► the same, unchanged
    request:        [ cached K/V of v0..v(n-1) | t0 .. t(L-1) ]   prefill computes the t's only

This is what peftkit's ``generate`` computes for the same adapter (one prefill over ``[v | t]``),
up to floating-point summation order. Entries are keyed by
``(expert.name, expert.version, expert.lora, expert.lora_version)``: a reloaded expert (new
``version``) or a changed LoRA never meets stale keys/values. The store is an LRU bounded by bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from peftkit.models.fast_linear import frozen_linear_on_onednn
from peftkit.serving.types import ServedExpert, SoftPrompt

PrefixKey = tuple[str, int, str | None, int]


@dataclass(frozen=True)
class CachedPrefix:
    """One expert's virtual-token attention states.

    Attributes:
        key_values: per decoder layer ``(keys, values)``, each ``(1, H_kv, n, d_head)``.
        num_virtual_tokens: ``n``; the user's first token sits at position ``n``.
    """

    key_values: tuple[tuple[Tensor, Tensor], ...]
    num_virtual_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.key_values for t in kv)


def prefix_key(expert: ServedExpert) -> PrefixKey:
    """What the cached states depend on: the expert's version and the LoRA under it."""
    return (expert.name, expert.version, expert.lora, expert.lora_version)


class PrefixStore:
    """Virtual-token keys/values per expert version, computed on first use; LRU-bounded by bytes.

    Args:
        model: the frozen Hugging Face causal LM the engine serves (eval mode).
        max_bytes: the most bytes of cached states kept; the least recently used entries go first.
            An entry larger than the whole budget is computed and returned but not kept.
        lora_bank: the engine's LoRA bank, needed for experts with a LoRA (their prompt's states are
            computed with that LoRA routed).
    """

    def __init__(self, model: nn.Module, *, max_bytes: int, lora_bank: Any = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model, self.max_bytes, self.lora_bank = model, max_bytes, lora_bank
        self._entries: OrderedDict[PrefixKey, CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, expert: ServedExpert) -> bool:
        return prefix_key(expert) in self._entries

    def get(self, expert: ServedExpert | None) -> CachedPrefix | None:
        """The expert's cached prefix (computed now if missing); ``None`` for no soft prompt."""
        return self.get_many([expert])[0]

    def get_many(self, experts: Sequence[ServedExpert | None]) -> list[CachedPrefix | None]:
        """Each expert's prefix (``None`` where there is no soft prompt); the missing ones are computed
        together, the prompt-tuning ones in one batched forward."""
        found: list[CachedPrefix | None] = [None] * len(experts)
        missing: dict[PrefixKey, list[int]] = {}
        with self._lock:
            for i, expert in enumerate(experts):
                if expert is None or expert.soft_prompt is None:
                    continue
                key = prefix_key(expert)
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    found[i] = entry
                elif key in missing:
                    self.hits += 1  # computed once for every row that asks
                    missing[key].append(i)
                else:
                    self.misses += 1
                    missing[key] = [i]
        if missing:
            computed = self.compute_many([experts[rows[0]] for rows in missing.values()])
            with self._lock:
                for (key, rows), entry in zip(missing.items(), computed, strict=True):
                    self._insert(key, entry)
                    for i in rows:
                        found[i] = entry
        return found

    def forget(self, name: str) -> int:
        """Drop every cached version of expert ``name``; returns how many entries went."""
        with self._lock:
            stale = [key for key in self._entries if key[0] == name]
            for key in stale:
                self.nbytes -= self._entries.pop(key).nbytes
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _insert(self, key: PrefixKey, entry: CachedPrefix) -> None:
        if key in self._entries or entry.nbytes > self.max_bytes:
            return
        stale = [k for k in self._entries if k[0] == key[0]]  # older versions of the same expert
        for k in stale:
            self.nbytes -= self._entries.pop(k).nbytes
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    def compute(self, expert: ServedExpert) -> CachedPrefix:
        """The expert's virtual-token states, computed now (nothing is cached)."""
        return self.compute_many([expert])[0]

    @torch.no_grad()
    def compute_many(self, experts: Sequence[ServedExpert]) -> list[CachedPrefix]:
        """The experts' virtual-token states, computed now (nothing is cached)."""
        param = next(self.model.parameters())
        out: list[CachedPrefix | None] = [None] * len(experts)
        prompts = []
        for i, expert in enumerate(experts):
            prompt = expert.soft_prompt
            if prompt is None:
                raise ValueError(f"expert {expert.name!r} has no soft prompt")
            if prompt.kind == "prefix":
                if prompt.key_values is None:
                    raise ValueError(f"expert {expert.name!r}: a prefix soft prompt needs key_values")
                layers = tuple(
                    (k.to(param.device, param.dtype).unsqueeze(0), v.to(param.device, param.dtype).unsqueeze(0))
                    for k, v in prompt.key_values
                )
                out[i] = CachedPrefix(layers, prompt.num_virtual_tokens)
            elif prompt.kind == "prompt" and prompt.embeddings is not None:
                prompts.append(i)
            else:
                raise ValueError(f"expert {expert.name!r}: soft prompt kind {prompt.kind!r} without embeddings")
        if prompts:
            encoded = self._encode([experts[i] for i in prompts])
            for i, layers in zip(prompts, encoded, strict=True):
                out[i] = CachedPrefix(layers, experts[i].soft_prompt.num_virtual_tokens)
        return out

    def _encode(self, experts: Sequence[ServedExpert]) -> list[tuple[tuple[Tensor, Tensor], ...]]:
        """Run the frozen model on each expert's ``n`` virtual embeddings alone (positions ``0 .. n-1``),
        all experts in one forward (left-padded to the longest prompt)."""
        param = next(self.model.parameters())
        embeddings = [e.soft_prompt.embeddings.to(param.device, param.dtype) for e in experts]  # each (n_i, D)
        counts = [x.shape[0] for x in embeddings]
        width = max(counts)
        embeds = torch.stack([F.pad(x, (0, 0, width - x.shape[0], 0)) for x in embeddings])  # (B, N, D)
        mask = torch.stack([F.pad(torch.ones(n, dtype=torch.long), (width - n, 0)) for n in counts]).to(param.device)
        cache = DynamicCache(config=self.model.config)
        with lora_routing(self.lora_bank, list(experts), param.device), frozen_linear_on_onednn(embeds):
            self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return [
            tuple(
                (layer.keys[i : i + 1, :, width - n :].clone(), layer.values[i : i + 1, :, width - n :].clone())
                for layer in cache.layers
            )
            for i, n in enumerate(counts)
        ]


def lora_routing(lora_bank: Any, experts: list[ServedExpert | None], device: torch.device) -> Any:
    """``lora_bank.routing(slots)`` for these rows (``-1`` = no LoRA), or a no-op without a bank.

    Raises:
        ValueError: a row's expert has a LoRA but the engine has no LoRA bank.
    """
    import contextlib

    names = [None if e is None else e.lora for e in experts]
    if lora_bank is None:
        wanted = sorted({n for n in names if n is not None})
        if wanted:
            raise ValueError(f"experts with a LoRA ({', '.join(wanted)}) need the engine's lora_bank")
        return contextlib.nullcontext()
    slots = torch.tensor([-1 if n is None else lora_bank.slot(n) for n in names], dtype=torch.long, device=device)
    return lora_bank.routing(slots)


def soft_prompt_of(adapter: nn.Module, expert: int | str = 0) -> SoftPrompt:
    """The :class:`SoftPrompt` of a peftkit prompt-tuning, p-tuning or prefix-tuning adapter (expert
    ``expert`` of a bank): the adapter's own ``served_prompt``."""
    from peftkit.experts.bank import expert_row

    return adapter.served_prompt(expert_row(adapter, expert))
