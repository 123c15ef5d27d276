"""Turning prompt/completion pairs into padded, length-bucketed tensor batches.

Prompt and completion are tokenised as separate *segments* and concatenated, so the loss mask is
exact (completion tokens only) without matching any template string.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peftkit.methods.base import IGNORE_INDEX


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ``input_ids`` and its ``labels`` (``-100`` outside the completion)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer: Any, prompt: str, completion: str = "", max_length: int | None = None) -> Encoded:
    """Tokenise ``prompt`` and ``completion`` as segments; the loss covers the completion only.

    With ``max_length``, the prompt is truncated from the left so the completion always survives.
    """
    segments = [(prompt, False), (completion, True)] if completion else [(prompt, False)]
    return encode_segments(tokenizer, segments, max_length=max_length)


def encode_segments(
    tokenizer: Any,
    segments: Sequence[tuple[str, bool]],
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    truncation: str = "left",
) -> Encoded:
    """Tokenise ``(text, trained)`` segments one by one and concatenate them.

    Tokens of a trained segment keep their id as label; the others get ``-100``. The first token's
    label is always ``-100``: nothing before it predicts it. ``add_special_tokens`` applies to the
    first segment only (e.g. a BOS token).

    Args:
        max_length: longest allowed example. ``truncation="left"`` drops the oldest tokens but never
            the last trained segment (an error if it alone is too long), ``"right"`` cuts the end.
    """
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right', got {truncation!r}")
    ids: list[int] = []
    labels: list[int] = []
    last_trained = (-1, 0)  # (start, length) of the last trained segment
    for text, trained in segments:
        if not text:
            continue
        special = add_special_tokens and not ids
        piece = list(tokenizer(text, add_special_tokens=special)["input_ids"]) if special else _plain(tokenizer, text)
        if trained and piece:
            last_trained = (len(ids), len(piece))
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if max_length is not None and len(ids) > max_length:
        drop = len(ids) - max_length
        if truncation == "right":
            ids, labels = ids[:max_length], labels[:max_length]
        else:
            start, length = last_trained
            if start >= 0 and drop >= start:
                raise ValueError(
                    f"completion alone has {length} tokens, too many for max_length={max_length} "
                    "(at least one prompt token must remain)"
                )
            ids, labels = ids[drop:], labels[drop:]
    if labels:
        labels[0] = IGNORE_INDEX
    return Encoded(ids, labels)


def _plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(examples: Sequence[Encoded], pad_token_id: int, padding_side: str = "left") -> dict[str, Tensor]:
    """Pad to the longest example: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, L)``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[row, span] = torch.tensor(example.input_ids)
        mask[row, span] = 1
        labels[row, span] = torch.tensor(example.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucketed_order(lengths: Sequence[int], batch_size: int, seed: int, window: int = 16) -> list[list[int]]:
    """Batches of indices with little padding: shuffle, sort within windows of ``window`` batches by
    length, cut into batches, then shuffle the batch order. Deterministic for a given ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def batches_forever(
    examples: Sequence[Encoded], batch_size: int, pad_token_id: int, seed: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Endless length-bucketed batches; each pass over the data reshuffles (seed + epoch)."""
    lengths = [len(e) for e in examples]
    epoch = 0
    while True:
        for indices in bucketed_order(lengths, batch_size, seed + epoch):
            yield collate([examples[i] for i in indices], pad_token_id)
        epoch += 1
