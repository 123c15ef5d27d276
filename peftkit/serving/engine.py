"""Continuous batching over many experts: requests join and leave the running batch at token boundaries.

One scheduler iteration (:meth:`Engine.step`)::

    waiting queue ──admit (free slots)──► prefill the new rows together: their own tokens only, over
                                          each expert's cached virtual-token keys/values (PrefixStore)
                                          ──► first token ──► join the running batch (KVBatch.concat)
    running batch ──one forward pass──► (B, V) logits ──► each row's own sampler ──► TokenEvent
                                          finished / cancelled rows leave at once (KVBatch.select)

Each row carries its expert (soft prompt and/or LoRA, or none = base) and its own decoding state
(:class:`RowSampler`: settings, seeded generator, stop strings), and its positions and cache columns
are its own, so what a request generates does not depend on its batch neighbours: greedy output equals
``PeftModel.generate`` run alone with that expert. With a ``lora_bank``, every forward runs inside
``lora_bank.routing(slots)`` so each row gets its own LoRA in the same pass.

Events reach the caller through a :class:`RequestHandle`: blocking iteration, ``async for`` (events are
pushed into the caller's event loop with ``call_soon_threadsafe``), ``cancel()`` and ``result()``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.serving.handle import RequestHandle, RequestResult
from peftkit.serving.kv_batch import KVBatch, check_model_cache, prefill
from peftkit.serving.prefix_store import PrefixStore, lora_routing
from peftkit.serving.sampling import RowSampler, choose_tokens
from peftkit.serving.types import FinishReason, PromptTooLong, QueueFull, ServeRequest, TokenEvent, Usage

__all__ = ["Engine", "EngineStats", "RequestHandle", "RequestResult"]

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0
"""Tokens per second are averaged over this many recent seconds."""


@dataclass(frozen=True)
class EngineStats:
    """What ``/metrics`` reports."""

    queue_depth: int
    running: int
    generated_tokens: int
    tokens_per_second: float
    finished_requests: int
    requests_by_expert: dict[str, int] = field(default_factory=dict)
    prefix_hits: int = 0
    """Requests whose expert's virtual-token states were already cached."""
    prefix_misses: int = 0
    prefix_bytes: int = 0


@dataclass(eq=False)  # rows compare by identity
class _Row:
    request: ServeRequest
    handle: RequestHandle
    sampler: Any

    @property
    def expert_name(self) -> str:
        return "base" if self.request.expert is None else self.request.expert.name


class Engine:
    """Continuous batching over a frozen causal LM and many experts.

    Args:
        model: a Hugging Face causal LM in eval mode (its weights may hold a merged LoRA).
        tokenizer: its tokenizer (detokenization, stop strings, grammar).
        lora_bank: a :class:`~peftkit.serving.lora_bank.LoraBank` on ``model``, for LoRA experts.
        max_batch_size: the most rows decoded together.
        max_queue: the most requests waiting for a slot; beyond it :meth:`submit` raises ``QueueFull``.
        max_model_len: the longest sequence (virtual tokens + prompt + new tokens); default the
            model config's ``max_position_embeddings``.
        prefix_store_bytes: the budget of the virtual-token key/value cache.
        ignore_eos: never stop at an end-of-sequence token (every request generates its
            ``max_new_tokens``, as vLLM's ``ignore_eos``): for benchmarks that need equal work.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        lora_bank: Any = None,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_model_len: int | None = None,
        prefix_store_bytes: int = 256 * 2**20,
        ignore_eos: bool = False,
    ) -> None:
        if model.training:
            raise ValueError("the engine serves a model in eval mode: call model.eval() first")
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0 (got {max_batch_size}, {max_queue})")
        check_model_cache(model.config)
        self.model, self.tokenizer, self.lora_bank = model, tokenizer, lora_bank
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2**31
        self.prefix_store = PrefixStore(model, max_bytes=prefix_store_bytes, lora_bank=lora_bank)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_ids = [] if ignore_eos else _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0
        self.device = next(model.parameters()).device

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []
        self._batch: KVBatch | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._generated = 0
        self._finished = 0
        self._by_expert: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()

    # ------------------------------------------------------------------ requests
    def submit(self, request: ServeRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``request``; its events go to the returned handle (into ``loop`` when given).

        Raises:
            ValueError: an empty prompt, a token id outside the vocabulary, or a LoRA expert without a bank.
            PromptTooLong: virtual tokens + prompt + ``max_new_tokens`` exceed ``max_model_len``.
            QueueFull: ``max_queue`` requests are already waiting.
        """
        if len(self._waiting) >= self.max_queue:  # before any work (a grammar compiles below); checked again
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)", retry_after=1.0)
        ids = [int(i) for i in request.prompt_ids]
        if not ids:
            raise ValueError("prompt_ids is empty: there is nothing to continue from")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt_ids holds a token id outside the vocabulary (0..{self.vocab_size - 1})")
        expert = request.expert
        virtual = expert.soft_prompt.num_virtual_tokens if expert and expert.soft_prompt else 0
        total = virtual + len(ids) + request.settings.max_new_tokens
        if total > self.max_model_len:
            raise PromptTooLong(
                f"prompt ({len(ids)} tokens) + virtual tokens ({virtual}) + max_tokens "
                f"({request.settings.max_new_tokens}) = {total} exceeds the model's {self.max_model_len}"
            )
        if expert is not None and expert.lora is not None and self.lora_bank is None:
            raise ValueError(f"expert {expert.name!r} has a LoRA but the engine has no lora_bank")
        sampler = RowSampler(
            request.settings, prompt_ids=ids, tokenizer=self.tokenizer, vocab_size=self.vocab_size, eos_ids=self.eos_ids
        )
        handle = RequestHandle(request.request_id, loop, self._wake)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)", retry_after=1.0)
            row = _Row(request, handle, sampler)
            self._waiting.append(row)
            self._by_expert[row.expert_name] += 1
            self._wake.notify_all()
        return handle

    # ------------------------------------------------------------------ scheduling
    def step(self) -> int:
        """One scheduler iteration: admit and prefill new rows, decode one token for every running row.

        Returns the number of tokens generated.
        """
        with self._step_lock:
            # first, so that their slots go to waiting requests in this same step
            ended = {i: self._ended(row) for i, row in enumerate(self._running)}
            ended = {i: reason for i, reason in ended.items() if reason is not None}
            if ended:
                for i, reason in ended.items():
                    self._end(self._running[i], reason)
                self._keep(sorted(set(range(len(self._running))) - set(ended)))
            with self._lock:
                aborted = [row for row in self._waiting if row.handle.cancelled]
                for row in aborted:
                    self._waiting.remove(row)
                admitted: list[_Row] = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
            for row in aborted:
                self._end(row, "abort")
            generated = self._admit(admitted) if admitted else 0
            if self._running:
                generated += self._decode()
            self._count(generated)
            return generated

    def _ended(self, row: _Row) -> FinishReason | None:
        """Why a row must leave before its next token: cancelled (``abort``), or its LoRA was removed or
        replaced in the bank since it was submitted (``error``: it would get another LoRA's weights)."""
        if row.handle.cancelled:
            return "abort"
        expert = row.request.expert
        if expert is None or expert.lora is None or self.lora_bank is None:
            return None
        if expert.lora not in self.lora_bank or self.lora_bank.version(expert.lora) != expert.lora_version:
            logger.warning("request %s: LoRA %r changed or went away while it ran", row.request.request_id, expert.lora)
            return "error"
        return None

    def _admit(self, rows: list[_Row]) -> int:
        """Prefill ``rows`` together, choose their first tokens, and add the unfinished ones to the batch."""
        stale = [row for row in rows if self._ended(row) is not None]
        for row in stale:
            self._end(row, self._ended(row))
        rows = [row for row in rows if row not in stale]
        if not rows:
            return 0
        try:
            prefixes = self.prefix_store.get_many([row.request.expert for row in rows])
            ready = rows
        except Exception:  # find the experts that fail, serve the others
            ready, prefixes = [], []
            for row in rows:
                try:
                    prefixes.append(self.prefix_store.get(row.request.expert))
                    ready.append(row)
                except Exception:
                    logger.exception("request %s: computing its expert's prefix failed", row.request.request_id)
                    self._end(row, "error")
        if not ready:
            return 0
        try:
            experts = [row.request.expert for row in ready]
            state, logits = prefill(
                self.model,
                [row.request.prompt_ids for row in ready],
                prefixes,
                routing=lora_routing(self.lora_bank, experts, self.device),
                pad_token_id=self.pad_token_id,
            )
            tokens = choose_tokens([row.sampler for row in ready], logits.float())
        except Exception:
            logger.exception("prefill of %d requests failed", len(ready))
            for row in ready:
                self._end(row, "error")
            return 0
        state.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        alive = [i for i, (row, token) in enumerate(zip(ready, tokens, strict=True)) if self._accept(row, token)]
        if len(alive) < len(ready):
            state = state.select(alive)
        if state is not None:
            self._batch = state if self._batch is None else self._batch.concat(state)
            self._running.extend(ready[i] for i in alive)
        return len(ready)

    def _decode(self) -> int:
        """One forward pass for every running row; finished rows leave the batch."""
        assert self._batch is not None
        rows = self._running
        try:
            routing = lora_routing(self.lora_bank, [row.request.expert for row in rows], self.device)
            logits = self._batch.decode(self.model, routing)
            tokens = choose_tokens([row.sampler for row in rows], logits.float())
        except Exception:
            logger.exception("decoding step of %d rows failed", len(rows))
            for row in rows:
                self._end(row, "error")
            self._running, self._batch = [], None
            return 0
        self._batch.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        alive = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True)) if self._accept(row, token)]
        if len(alive) < len(rows):
            self._keep(alive)
        return len(rows)

    def _keep(self, alive: list[int]) -> None:
        assert self._batch is not None
        self._batch = self._batch.select(alive)
        self._running = [self._running[i] for i in alive]

    def _accept(self, row: _Row, token: int) -> bool:
        """Give ``token`` to the row's sampler and stream it; ``False`` when the row has finished."""
        text, reason = row.sampler.accept(token)
        usage = self._usage(row) if reason is not None else None
        row.handle._push(TokenEvent(row.request.request_id, token, text, reason, usage))
        if reason is not None:
            self._finished += 1
        return reason is None

    def _end(self, row: _Row, reason: FinishReason) -> None:
        """Finish a row that did not end by itself (``abort``, ``error``)."""
        text = row.sampler.finish() if reason == "abort" else ""
        row.handle._push(TokenEvent(row.request.request_id, None, text, reason, self._usage(row)))
        self._finished += 1

    @staticmethod
    def _usage(row: _Row) -> Usage:
        return Usage(prompt_tokens=len(row.request.prompt_ids), completion_tokens=len(row.sampler.generated))

    # ------------------------------------------------------------------ running
    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until nothing waits or runs (or ``max_steps``); returns the steps taken."""
        steps = 0
        while self.has_work and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return steps

    @property
    def running(self) -> bool:
        """Whether the background thread of :meth:`start` is alive (``False`` before it, after :meth:`stop`,
        or when the thread died); ``GET /health`` answers 503 while it is ``False``."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Run steps in a background daemon thread (it sleeps while there is nothing to do)."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
        self._thread.start()

    def stop(self, abort_pending: bool = False) -> None:
        """Stop the background thread after its current step; ``abort_pending`` also ends every
        waiting and running request (final event ``abort``)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if abort_pending:
            with self._step_lock:
                with self._lock:
                    rows, self._waiting = list(self._waiting) + self._running, collections.deque()
                self._running, self._batch = [], None
                for row in rows:
                    self._end(row, "abort")

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug in the loop itself: keep serving the next requests
                logger.exception("engine step failed")

    # ------------------------------------------------------------------ metrics
    def _count(self, generated: int) -> None:
        now = time.monotonic()
        self._generated += generated
        if generated:
            self._recent.append((now, generated))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - RATE_WINDOW_S]
        span = min(RATE_WINDOW_S, now - self._started)
        rate = sum(n for _, n in recent) / span if span > 0 else 0.0
        return EngineStats(
            queue_depth=len(self._waiting),
            running=len(self._running),
            generated_tokens=self._generated,
            tokens_per_second=rate,
            finished_requests=self._finished,
            requests_by_expert=dict(self._by_expert),
            prefix_hits=self.prefix_store.hits,
            prefix_misses=self.prefix_store.misses,
            prefix_bytes=self.prefix_store.nbytes,
        )


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config (what ``generate`` stops at) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for eos in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(i) for i in eos)
    return sorted(ids)
