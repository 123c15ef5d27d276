"""A stand-in for :mod:`peftkit.serving.sampling` until it lands: the same interface, fewer features.

Greedy and temperature / top-k / top-p / min-p sampling with the repetition penalty
(:meth:`DecodingSettings.processors`), a per-row seeded generator, end-of-sequence, stop strings and
``max_new_tokens``. No presence / frequency penalties and no grammar (both refused).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from peftkit.decoding import DecodingSettings, StopScanner
from peftkit.serving.types import FinishReason


class RowSampler:
    """One row's decoding: :meth:`choose` a token from ``(V,)`` logits, then :meth:`accept` it."""

    def __init__(
        self,
        settings: DecodingSettings,
        *,
        prompt_ids: Sequence[int],
        tokenizer: Any,
        vocab_size: int,
        eos_ids: Iterable[int],
    ) -> None:
        if settings.grammar is not None:
            raise NotImplementedError("grammar needs peftkit.serving.sampling")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(settings, name, 0.0):
                raise NotImplementedError(f"{name} needs peftkit.serving.sampling")
        self.settings, self.tokenizer, self.vocab_size = settings, tokenizer, vocab_size
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.generated: list[int] = []
        self._text_ids: list[int] = []
        self._processors = settings.processors()
        self._scanner = StopScanner(settings.stop)
        seed = settings.seed if settings.seed is not None else int(torch.Generator().seed())
        self._generator = torch.Generator().manual_seed(seed)
        self.finish_reason: FinishReason | None = None

    def choose(self, logits: Tensor) -> int:
        sequence = torch.tensor([self.prompt_ids + self.generated], dtype=torch.long, device=logits.device)
        scores = self._processors(sequence, logits.float()[None])  # (1, V)
        if not self.settings.do_sample:
            return int(scores[0].argmax())
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        token = int(token)
        self.generated.append(token)
        if token in self.eos_ids:
            return self._finish("stop")
        self._text_ids.append(token)
        released = self._scanner.update(self.tokenizer.decode(self._text_ids, skip_special_tokens=True))
        if self._scanner.stopped:
            self.finish_reason = "stop"
            return released, "stop"
        if len(self.generated) >= self.settings.max_new_tokens:
            return self._finish("length", released)
        return released, None

    def _finish(self, reason: FinishReason, released: str = "") -> tuple[str, FinishReason]:
        self.finish_reason = reason
        return released + self.finish(), reason

    def finish(self) -> str:
        """Release the text held back for a possible stop string."""
        if self._scanner.stopped:
            return ""
        return self._scanner.update(self._scanner.text, final=True)


def choose_tokens(samplers: Sequence[RowSampler], logits: Tensor) -> list[int]:
    """One token per row of ``(B, V)`` logits."""
    return [sampler.choose(row) for sampler, row in zip(samplers, logits, strict=True)]
