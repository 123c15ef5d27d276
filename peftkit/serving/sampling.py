"""One row's decoding in the serving engine: scores to a token, tokens to streamed text.

::

    logits (V,) ─► repetition penalty (prompt + generated) ─► presence / frequency penalties (generated)
               ─► grammar mask (this row's matcher) ─► temperature ─► top-k ─► top-p ─► min-p
               ─► argmax (temperature 0) or a sample from this row's own generator

The transforms are :meth:`DecodingSettings.processors <peftkit.decoding.DecodingSettings.processors>`,
the ones ``generate`` and the streaming session apply, so a greedy row equals ``generate`` alone. The
sampling warpers keep Hugging Face's definitions but skip its full-vocabulary sort
(:meth:`RowSampler.distribution`), and a row draws with one uniform from its own ``torch.Generator``
(inverse CDF), so a seeded row's samples do not depend on what else is in the batch (they are not
``generate(seed=...)``'s draws, which use ``torch.multinomial`` over the whole vocabulary).

Text is detokenized incrementally (as TGI and vLLM do): each step decodes a short window of recent
tokens and releases only text that no later token can change (never a trailing incomplete UTF-8
character). :class:`~peftkit.decoding.StopScanner` then holds back text that could still become a
stop string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from peftkit.decoding import DecodingSettings, Grammar, StopScanner
from peftkit.serving.types import FinishReason

__all__ = ["RowSampler", "choose_tokens", "compiled_grammar"]


@lru_cache(maxsize=64)
def _compiled(tokenizer: Any, vocab_size: int, grammar_json: str) -> Any:
    from peftkit.grammar import compile_grammar

    return compile_grammar(Grammar.model_validate(json.loads(grammar_json)), tokenizer, vocab_size)


def compiled_grammar(grammar: Grammar, tokenizer: Any, vocab_size: int) -> Any:
    """The :class:`~peftkit.grammar.CompiledGrammar` of ``grammar``, compiled once per (tokenizer,
    vocabulary size, grammar JSON): 32 rows with the same schema compile it once."""
    return _compiled(tokenizer, vocab_size, json.dumps(grammar.model_dump(), sort_keys=True))


class RowSampler:
    """One request's decoding state: :meth:`choose` a token from its logits, then :meth:`accept` it.

    Args:
        settings: the request's decoding settings (``stop``, ``max_new_tokens``, ``seed`` included).
        prompt_ids: the prompt's token ids (the repetition penalty covers them, as in Hugging Face).
        tokenizer: a Hugging Face tokenizer (detokenization; the grammar's vocabulary).
        vocab_size: ``V``, the logits' width.
        eos_ids: the end-of-sequence token ids.

    Attributes:
        generated: the tokens accepted so far (an ending end-of-sequence token included).
        text: the text released so far (cut before a stop string).
        finish_reason: ``None`` while running; then ``"stop"`` or ``"length"`` (or ``"abort"`` after
            :meth:`finish`).
        seed: the generator's seed (``settings.seed``, or a random one).
    """

    def __init__(
        self,
        settings: DecodingSettings,
        *,
        prompt_ids: Sequence[int],
        tokenizer: Any,
        vocab_size: int,
        eos_ids: Iterable[int],
    ) -> None:
        self.settings, self.tokenizer, self.vocab_size = settings, tokenizer, vocab_size
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.prompt_length = len(prompt_ids)
        self.generated: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        # Prompt and generated ids in one buffer; the processors see its filled part (1, L).
        self._ids = torch.empty(1, self.prompt_length + settings.max_new_tokens, dtype=torch.long)
        self._ids[0, : self.prompt_length] = torch.tensor(list(prompt_ids), dtype=torch.long)
        self._matcher = None
        if settings.grammar is not None:
            self._matcher = compiled_grammar(settings.grammar, tokenizer, vocab_size).matcher()
        # Penalties and the grammar mask: generate's processors (a greedy copy: no sampling warpers).
        self._processors = settings.model_copy(update={"temperature": 0.0}).processors(
            [self._mask] if self._matcher is not None else [], prompt_length=self.prompt_length
        )
        self.plain_greedy = not settings.do_sample and not settings.has_penalties and self._matcher is None
        """No penalty, no grammar, temperature 0: the token is the logits' argmax (batched by
        :func:`choose_tokens`)."""
        self.seed = settings.seed if settings.seed is not None else int(torch.Generator().seed())
        self._generator: torch.Generator | None = None
        self._scanner = StopScanner(settings.stop)
        self._decoded = ""  # all stable text so far, before stop strings are looked for
        self._text_ids: list[int] = []  # generated ids that are text (not end-of-sequence)
        self._prefix_offset = 0  # the window start: decoding starts here for context (spaces, merges)
        self._read_offset = 0  # text of ids before this index has been released into _decoded

    def choose(self, logits: Tensor) -> int:
        """The next token for a ``(V,)`` float logits row."""
        if self.finish_reason is not None:
            raise RuntimeError(f"this row has finished ({self.finish_reason}); it chooses no more tokens")
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size:
            raise ValueError(f"logits must be (V,) = ({self.vocab_size},); got {tuple(logits.shape)}")
        if self.plain_greedy:
            return int(logits.argmax())
        length = self.prompt_length + len(self.generated)
        sequence = self._ids[:, :length].to(logits.device)
        scores = self._processors(sequence, logits.float()[None])[0]  # (V,)
        if not self.settings.do_sample:
            return int(scores.argmax())
        indices, probs = self.distribution(scores)
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        cdf = probs.double().cumsum(0)
        u = torch.rand((), generator=self._generator, device=logits.device, dtype=torch.float64) * cdf[-1]
        i = int(torch.searchsorted(cdf, u[None], right=True).clamp(max=cdf.numel() - 1))
        return int(indices[i])

    def distribution(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """The sampling distribution of ``scores`` ``(V,)`` (after penalties and grammar): the tokens
        that temperature, top-k, top-p and min-p keep, ``(m,)``, and their probabilities (not
        renormalised).

        Hugging Face's warpers (what ``generate`` applies) sort the whole vocabulary for top-p: about
        8 ms a row at V = 49,152 on one core. This computes the same set from a partial top-k that
        grows until it covers ``top_p`` of the mass. Tokens tied with the k-th at top-k are dropped
        (Hugging Face keeps them); float rounding may differ at a top-p boundary.
        """
        s = self.settings
        scores = scores / s.temperature if s.temperature != 1.0 else scores
        vocab = scores.numel()
        values = indices = None
        if 0 < s.top_k < vocab:
            values, indices = scores.topk(s.top_k)  # sorted, descending
            log_z = torch.logsumexp(values, 0)
        else:
            log_z = torch.logsumexp(scores, 0)
            if s.top_p < 1.0:  # a partial top-k covering top_p of the mass holds the whole nucleus
                k = min(64, vocab)
                while True:
                    values, indices = scores.topk(k)
                    if k == vocab or float((values - log_z).exp().sum()) >= s.top_p + 1e-6:
                        break
                    k = min(k * 8, vocab)
        if values is None or indices is None:  # no top-k, no top-p: the whole vocabulary
            probs = (scores - log_z).exp()
            if s.min_p > 0:
                indices = (probs >= s.min_p * probs.max()).nonzero().squeeze(1)
                return indices, probs[indices]
            return torch.arange(vocab, device=scores.device), probs
        probs = (values - log_z).exp()
        keep = probs.numel()
        if s.top_p < 1.0:  # keep the tokens whose higher-ranked mass is below top_p (at least one)
            before = probs.cumsum(0) - probs
            keep = max(1, int((before < s.top_p).sum()))
        if s.min_p > 0:
            keep = min(keep, max(1, int((probs[:keep] >= s.min_p * probs[0]).sum())))
        return indices[:keep], probs[:keep]

    def _mask(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        assert self._matcher is not None
        return self._matcher.mask(scores[0])[None]

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Append ``token``; returns the newly released text and the finish reason (``None``: go on).

        ``"stop"``: an end-of-sequence token, a stop string (the text ends before it) or the
        grammar's end; ``"length"``: ``max_new_tokens`` reached. A finishing step releases all the
        remaining text, so :meth:`finish` then returns ``""``.
        """
        if self.finish_reason is not None:
            raise RuntimeError(f"this row has finished ({self.finish_reason}); it accepts no more tokens")
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        self._ids[0, self.prompt_length + len(self.generated)] = token
        self.generated.append(token)
        if token in self.eos_ids:
            return self._finish("stop")
        if self._matcher is not None:
            self._matcher.accept(token)
        self._text_ids.append(token)
        self._decoded += self._stable_text()
        released = self._scanner.update(self._decoded)
        self.text += released
        if self._scanner.stopped:
            self.finish_reason = "stop"
            return released, "stop"
        if self._matcher is not None and self._matcher.done:
            out, reason = self._finish("stop")
            return released + out, reason
        if len(self.generated) >= self.settings.max_new_tokens:
            out, reason = self._finish("length")
            return released + out, reason
        return released, None

    def finish(self) -> str:
        """End the row (an abort, unless it had finished): returns the text still held back."""
        if self.finish_reason is not None:
            return ""
        return self._finish("abort")[0]

    def _finish(self, reason: FinishReason) -> tuple[str, FinishReason]:
        self.finish_reason = reason
        self._decoded += self._stable_text(final=True)
        released = self._scanner.update(self._decoded, final=True)
        self.text += released
        if self._scanner.stopped and reason != "abort":
            self.finish_reason = reason = "stop"  # the flushed tail held a stop string
        return released, reason

    def _stable_text(self, final: bool = False) -> str:
        """The text of ``_text_ids`` not yet in ``_decoded`` that later tokens cannot change.

        Decodes the window ``[prefix_offset:]`` and keeps what it adds to ``[prefix_offset:read_offset]``;
        the context tokens make leading spaces and merges decode as in the whole sequence. A trailing
        U+FFFD is an incomplete UTF-8 character: wait for its next token (unless ``final``).
        """
        ids = self._text_ids
        if self._read_offset >= len(ids):
            return ""
        before = self._decode(ids[self._prefix_offset : self._read_offset])
        after = self._decode(ids[self._prefix_offset :])
        if len(after) <= len(before) and not final:
            return ""
        if after.endswith("\ufffd") and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def choose_tokens(samplers: Sequence[RowSampler], logits: Tensor) -> list[int]:
    """The next token of each row of a ``(B, V)`` batch: one batched argmax for the plain greedy rows
    (no penalty, no grammar, temperature 0), :meth:`RowSampler.choose` for the others."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be (B, V) with B = {len(samplers)} samplers; got {tuple(logits.shape)}")
    tokens = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.plain_greedy and s.finish_reason is None]
    if greedy:
        rows = logits[greedy] if len(greedy) < len(samplers) else logits
        for i, token in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
            tokens[i] = int(token)
    batched = set(greedy)
    for i, sampler in enumerate(samplers):
        if i not in batched:
            tokens[i] = sampler.choose(logits[i])  # a finished row raises here
    return tokens
