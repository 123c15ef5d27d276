"""What the prefix store saves: a request's prefill over cached virtual-token keys/values, against
recomputing the virtual tokens with every request (what ``generate`` does).

::

    recompute:  model([v0 .. v(n-1) | t0 .. t(L-1)])      n + L positions per request
    cached:     model([t0 .. t(L-1)] over cached K/V)       L positions per request (+ n once per expert)

Used by ``peftkit bench serve``; not a test. Both sides run the same frozen layers (oneDNN routing
included) and are checked to give the same last-token logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.models.fast_linear import frozen_linear_on_onednn
from peftkit.serving.kv_batch import prefill
from peftkit.serving.prefix_store import PrefixStore
from peftkit.serving.types import ServedExpert, SoftPrompt


@dataclass(frozen=True)
class PrefillSaving:
    """Median prefill times of one request, in milliseconds."""

    virtual_tokens: int
    prompt_tokens: int
    batch_size: int
    repeats: int
    recompute_ms: float
    """Virtual tokens and prompt in one forward, every request."""
    cached_ms: float
    """The prompt only, over the cached prefix."""
    prefix_once_ms: float
    """Computing the expert's prefix once (the store's miss)."""
    max_logit_difference: float
    """Largest ``|logit|`` difference between the two ways (float rounding only)."""

    @property
    def speedup(self) -> float:
        return self.recompute_ms / self.cached_ms

    @property
    def saving(self) -> float:
        """The fraction of prefill time saved."""
        return 1.0 - self.cached_ms / self.recompute_ms

    def describe(self) -> str:
        return (
            f"prefill of {self.batch_size} x {self.prompt_tokens} tokens with {self.virtual_tokens} virtual tokens: "
            f"recompute {self.recompute_ms:.2f} ms, cached prefix {self.cached_ms:.2f} ms "
            f"({self.speedup:.2f}x, {self.saving:.0%} saved; the prefix once: {self.prefix_once_ms:.2f} ms; "
            f"max |logit diff| {self.max_logit_difference:.1e})"
        )


@torch.no_grad()
def prefill_saving(
    model: nn.Module,
    tokenizer: Any,
    soft_prompt: SoftPrompt,
    prompt_ids: Sequence[int] | str,
    repeats: int = 20,
    *,
    batch_size: int = 1,
    warmup: int = 2,
) -> PrefillSaving:
    """Time a prompt-tuning request's prefill with the cached prefix against recomputing it.

    Args:
        model: the frozen causal LM (eval mode).
        tokenizer: used when ``prompt_ids`` is text.
        soft_prompt: a ``"prompt"`` soft prompt (prefix tuning's states are parameters: nothing to save).
        prompt_ids: the request's tokens (or its text).
        repeats: timed runs of each side (the median is reported), after ``warmup`` untimed ones.
        batch_size: requests prefilled together (all the same request).
    """
    if soft_prompt.kind != "prompt" or soft_prompt.embeddings is None:
        raise ValueError("prefill_saving needs a prompt-tuning soft prompt (kind 'prompt' with embeddings)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ids = list(tokenizer(prompt_ids)["input_ids"]) if isinstance(prompt_ids, str) else [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty")
    param = next(model.parameters())
    n = soft_prompt.num_virtual_tokens
    expert = ServedExpert("measured", 1, soft_prompt=soft_prompt)
    store = PrefixStore(model, max_bytes=2**40)
    started = time.perf_counter()
    prefix = store.get(expert)
    prefix_once_ms = (time.perf_counter() - started) * 1e3

    token_ids = torch.tensor([ids] * batch_size, device=param.device)
    virtual = soft_prompt.embeddings.to(param.device, param.dtype).expand(batch_size, -1, -1)
    positions = torch.arange(n + len(ids), device=param.device).expand(batch_size, -1)

    def recompute() -> torch.Tensor:
        embeds = torch.cat([virtual, model.get_input_embeddings()(token_ids)], dim=1)
        with frozen_linear_on_onednn(embeds):
            out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def cached() -> torch.Tensor:
        return prefill(model, [ids] * batch_size, [prefix] * batch_size)[1]

    difference = float((recompute() - cached()).abs().max())
    recompute_ms, cached_ms = _median_ms([recompute, cached], repeats, warmup)
    return PrefillSaving(
        virtual_tokens=n,
        prompt_tokens=len(ids),
        batch_size=batch_size,
        repeats=repeats,
        recompute_ms=recompute_ms,
        cached_ms=cached_ms,
        prefix_once_ms=prefix_once_ms,
        max_logit_difference=difference,
    )


def _median_ms(runs: Sequence[Callable[[], Any]], repeats: int, warmup: int) -> list[float]:
    """Median milliseconds of each run, interleaved (a busy machine slows both sides alike)."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, kept in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            kept.append((time.perf_counter() - started) * 1e3)
    return [statistics.median(kept) for kept in times]
