"""The serving layer's shared types: what the registry hands the engine, what a request carries,
and what the engine streams back.

The pieces (see ``docs/serving.md``)::

    ExpertRegistry (registry.py)   name -> ServedExpert; loads .expert files, adapter folders, banks;
                                   LoRA weights go into the LoraBank; LRU under a memory budget
    LoraBank (lora_bank.py)        per-row gathered LoRA (Punica / S-LoRA): one pass for any mix
    PrefixStore (prefix_store.py)  an expert's virtual-token keys/values, computed once per
                                   (expert version, LoRA version) and reused by every request
    RowSampler (sampling.py)       one row's decoding: penalties, grammar, top-k/p, min-p, seed,
                                   stop strings, incremental text
    Engine (engine.py)             continuous batching over all of the above
    http/ (app.py ...)             the OpenAI-compatible FastAPI server (`peftkit serve`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from peftkit.decoding import DecodingSettings

FinishReason = Literal["stop", "length", "abort", "error"]


class ServingError(Exception):
    """Base class of the errors the HTTP layer maps to status codes."""

    status = 500


class UnknownExpert(ServingError):  # noqa: N818 (HTTP-style name, like FastAPI's)
    """No expert by that name (and no fallback found one): 404."""

    status = 404


class QueueFull(ServingError):  # noqa: N818
    """The engine's waiting queue is full: 429 with ``Retry-After``."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLong(ServingError):  # noqa: N818
    """The prompt (plus virtual tokens and max tokens) does not fit the model: 413."""

    status = 413


@dataclass(frozen=True)
class SoftPrompt:
    """An expert's soft prompt, in one of two forms.

    Attributes:
        kind: ``"prompt"`` (prompt tuning / p-tuning: ``embeddings`` ``(n, D)`` fed as the first
            ``n`` input embeddings) or ``"prefix"`` (prefix tuning: ``key_values``, per layer
            ``(keys, values)`` each ``(H_kv, n, d)``, already the attention's keys and values).
        num_virtual_tokens: ``n``.
    """

    kind: Literal["prompt", "prefix"]
    num_virtual_tokens: int
    embeddings: Tensor | None = None
    key_values: tuple[tuple[Tensor, Tensor], ...] | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.embeddings] if self.embeddings is not None else [t for kv in self.key_values or () for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ServedExpert:
    """One expert as the engine sees it: an optional soft prompt, an optional LoRA (by its slot name in
    the engine's :class:`~peftkit.serving.lora_bank.LoraBank`) and its manifest decoding defaults.

    ``version`` changes on every (re)load: caches keyed on it (the prefix store) never serve stale
    keys/values. Both ``soft_prompt`` and ``lora`` ``None`` is the bare base model.
    """

    name: str
    version: int
    soft_prompt: SoftPrompt | None = None
    lora: str | None = None
    lora_version: int = 0
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    source: str = ""
    nbytes: int = 0


@dataclass
class ServeRequest:
    """One generation request, resolved: token ids, the expert that serves it (``None`` = base), the
    fallback level it was resolved at, and its final decoding settings (manifest defaults overridden
    by the request's own fields, including OpenAI's ``presence_penalty`` / ``frequency_penalty``).
    """

    request_id: str
    prompt_ids: list[int]
    expert: ServedExpert | None
    settings: DecodingSettings
    level: str = "base"


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's stream.

    ``token_id`` is the token generated this step (``None`` on a final event that carries no token);
    ``text`` the newly released text (held back while it could still become a stop string; cut before
    the stop string). The last event has ``finish_reason`` set and ``usage`` filled.
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
