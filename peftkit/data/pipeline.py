"""Records → formatted segments → token ids → length-bucketed, sharded batches, with a resumable
position.

::

    source ──► formatter ──► encode_segments ──► global batches ──► this rank's rows ──► collate
    (records)   (segments)    (ids, labels)      (bucketed by length)  (rank r of N)

Two ways to read the data:

* **in memory** (default): every record is tokenised once up front. Each epoch shuffles with
  ``seed + epoch``, sorts windows of ``bucket_window`` batches by length and cuts them into
  batches (:func:`~peftkit.data.batching.bucketed_order`), so little padding is computed.
* **streamed** (``streaming=True``): records are read lazily, ``batch_size × bucket_window`` at a
  time; each window is sorted by length, cut into batches, and the batches are shuffled within the
  window. Nothing else is held in memory.

Batches are *global*: under ``torchrun`` every process builds the same sequence and takes its own
contiguous slice of each batch (``DistributedSampler`` semantics with ``set_epoch``: the order
depends only on the seed and the epoch), so N processes see exactly what one process sees.

A :class:`DataPosition` says where the next batch starts; it is saved in checkpoints so that a
resumed run reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from peftkit.data.batching import Encoded, bucketed_order, collate, encode_segments
from peftkit.data.formatters import FormatError, Formatted
from peftkit.data.sources import RecordSource
from peftkit.methods.base import IGNORE_INDEX

TRUNCATIONS = ("left", "right", "drop")


@dataclass
class DataPosition:
    """Where the next batch starts.

    Attributes:
        epoch: passes over the data completed.
        record: streamed data: records consumed before the current window (0 in memory).
        batch: batches already taken from the epoch (in memory) or from the window (streamed).
    """

    epoch: int = 0
    record: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> DataPosition:
        return cls(**{k: int(v) for k, v in data.items()})


@dataclass
class Batch:
    """One global batch as this process sees it.

    Attributes:
        tensors: this rank's rows: ``input_ids``, ``attention_mask``, ``labels`` ``(b, L)``;
            ``b`` may be 0 when a short last batch has fewer rows than processes.
        num_tokens: attended tokens in this rank's rows.
        num_label_tokens: labelled tokens in this rank's rows (the loss normaliser's share).
        position: the position *after* this batch.
        epoch_end: this is the last batch of its epoch.
        routes: per row, adapter name → expert id (many-expert data, :mod:`peftkit.data.experts`).
        step_end: many-expert data: the last micro-batch of an optimiser step (``None``: the
            trainer counts ``gradient_accumulation_steps``).
    """

    tensors: dict[str, Tensor]
    num_tokens: int
    num_label_tokens: int
    position: DataPosition
    epoch_end: bool = False
    routes: list[dict[str, Any]] | None = None
    step_end: bool | None = None

    @property
    def rows(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Batch:
        """A ready-made batch (``input_ids``, ``attention_mask``, ``labels``) without a data position.

        Only labels from column 1 on count: nothing predicts a row's first token (so ``labels=input_ids``,
        the Hugging Face convention, counts ``L - 1`` targets per row).
        """
        labels, mask = tensors["labels"], tensors.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else labels.numel()
        predicted = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return cls(dict(tensors), tokens, predicted, None)  # type: ignore[arg-type]


@dataclass
class DataStats:
    """What tokenisation kept and dropped (in-memory data; streamed data counts as it reads)."""

    records: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    dropped_unlabelled: int = 0
    tokens: int = 0
    label_tokens: int = 0
    errors: list[str] = field(default_factory=list)


class TokenizedData:
    """Training or evaluation batches from a record source.

    Args:
        source: where the records come from.
        formatter: record → :class:`~peftkit.data.formatters.Formatted`.
        tokenizer: a Hugging Face tokenizer (or anything callable like one).
        batch_size: rows per *global* batch (split across processes).
        max_length: longest example in tokens (``None``: no limit).
        truncation: ``"left"`` (drop the oldest prompt tokens), ``"right"`` (cut the end) or
            ``"drop"`` (skip examples longer than ``max_length``).
        shuffle: shuffle each epoch (seeded); ``False`` keeps the source order within buckets.
        bucket_window: batches per length-sorting window (1 = no bucketing).
        name: how messages refer to this data (e.g. ``data.train``).
    """

    def __init__(
        self,
        source: RecordSource,
        formatter: Callable[[Mapping[str, Any]], Formatted],
        tokenizer: Any,
        *,
        batch_size: int,
        max_length: int | None = None,
        truncation: str = "left",
        padding_side: str = "left",
        shuffle: bool = True,
        seed: int = 0,
        bucket_window: int = 16,
        rank: int = 0,
        world_size: int = 1,
        name: str = "data",
    ) -> None:
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if batch_size < 1 or bucket_window < 1:
            raise ValueError(f"batch_size and bucket_window must be >= 1, got {batch_size}, {bucket_window}")
        self.source, self.formatter, self.tokenizer = source, formatter, tokenizer
        self.batch_size, self.max_length, self.truncation = batch_size, max_length, truncation
        self.padding_side, self.shuffle, self.seed, self.bucket_window = padding_side, shuffle, seed, bucket_window
        self.rank, self.world_size, self.name = rank, world_size, name
        self.pad_token_id = _pad_id(tokenizer)
        self.stats = DataStats()
        self.examples: list[Encoded] | None = None
        if not source.streaming:
            self.examples = [e for e in map(self._encode, enumerate(source)) if e is not None]
            if not self.examples:
                raise ValueError(self._nothing_to_train_on())

    @property
    def streaming(self) -> bool:
        return self.examples is None

    def batches_per_epoch(self) -> int | None:
        """Global batches in one epoch (``None`` for streamed data, unknown until read)."""
        return None if self.examples is None else -(-len(self.examples) // self.batch_size)

    # ------------------------------------------------------------------ iteration
    def batches(self, start: DataPosition | None = None) -> Iterator[Batch]:
        """Batches without end, from ``start``; epochs follow one another."""
        position = start or DataPosition()
        epoch = position.epoch
        while True:
            produced = False
            first = position if epoch == position.epoch else DataPosition(epoch)
            for batch in _mark_last(self._epoch(first)):
                produced = True
                yield batch
            if not produced and first.record == 0 and first.batch == 0:
                raise ValueError(self._nothing_to_train_on())
            epoch += 1

    def one_pass(self) -> Iterator[Batch]:
        """One epoch (epoch 0) from the start: what evaluation reads."""
        return _mark_last(self._epoch(DataPosition()))

    def _epoch(self, start: DataPosition) -> Iterator[Batch]:
        if self.examples is not None:
            order = self._order([len(e) for e in self.examples], start.epoch)
            for b in range(start.batch, len(order)):
                yield self._batch([self.examples[i] for i in order[b]], DataPosition(start.epoch, 0, b + 1))
            return
        records = enumerate(self.source.skip(start.record), start.record)
        offset, skip = start.record, start.batch
        window_records = self.batch_size * self.bucket_window
        while True:
            window = list(itertools.islice(records, window_records))
            if not window:
                return
            examples = [e for e in map(self._encode, window) if e is not None]
            order = self._order([len(e) for e in examples], start.epoch, salt=offset)
            for b in range(skip, len(order)):
                yield self._batch([examples[i] for i in order[b]], DataPosition(start.epoch, offset, b + 1))
            offset, skip = offset + len(window), 0

    def _order(self, lengths: Sequence[int], epoch: int, salt: int = 0) -> list[list[int]]:
        if self.shuffle:
            return bucketed_order(lengths, self.batch_size, self.seed + epoch + 1_000_003 * salt, self.bucket_window)
        span = self.batch_size * self.bucket_window
        batches: list[list[int]] = []
        for start in range(0, len(lengths), span):
            chunk = sorted(range(start, min(start + span, len(lengths))), key=lambda i: lengths[i])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        return batches

    def _batch(self, examples: list[Encoded], position: DataPosition) -> Batch:
        """This rank's contiguous share of a global batch (sizes differ by at most one row)."""
        mine = shard(examples, self.rank, self.world_size)
        if mine:
            tensors = collate(mine, self.pad_token_id, self.padding_side)
        else:
            import torch

            empty = torch.zeros((0, 0), dtype=torch.long)
            tensors = {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        labels = tensors["labels"]
        return Batch(tensors, int(tensors["attention_mask"].sum()), int((labels != IGNORE_INDEX).sum()), position)

    # ------------------------------------------------------------------ tokenisation
    def _encode(self, item: tuple[int, Mapping[str, Any]]) -> Encoded | None:
        index, record = item
        self.stats.records += 1
        try:
            formatted = self.formatter(record)
            segments = [(s.text, s.train) for s in formatted.segments]
            truncation = "left" if self.truncation == "drop" else self.truncation
            limit = None if self.truncation == "drop" else self.max_length
            example = encode_segments(
                self.tokenizer,
                segments,
                add_special_tokens=formatted.add_special_tokens,
                max_length=limit,
                truncation=truncation,
            )
        except (FormatError, ValueError) as exc:
            raise ValueError(f"{self.name}: record {index} of {self.source.name}: {exc}") from None
        if self.truncation == "drop" and self.max_length is not None and len(example) > self.max_length:
            self.stats.dropped_too_long += 1
            return None
        labelled = sum(label != IGNORE_INDEX for label in example.labels)
        if not labelled:
            self.stats.dropped_unlabelled += 1
            return None
        self.stats.examples += 1
        self.stats.tokens += len(example)
        self.stats.label_tokens += labelled
        return example

    def _nothing_to_train_on(self) -> str:
        s = self.stats
        if s.records == 0:
            return f"{self.name}: {self.source.name} has no records"
        if s.dropped_unlabelled == s.records:
            return (
                f"{self.name}: every label is masked: none of the {s.records} records of {self.source.name} "
                "has a token to train on (the formatter produced no trained segment, or truncation removed it)"
            )
        return (
            f"{self.name}: no usable example in {s.records} records of {self.source.name} "
            f"({s.dropped_too_long} longer than max_length={self.max_length}, {s.dropped_unlabelled} without labels)"
        )


def shard(rows: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous slice of ``rows`` when split ``world_size`` ways as evenly as possible."""
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return list(rows[start : start + base + (1 if rank < extra else 0)])


def _mark_last(batches: Iterator[Batch]) -> Iterator[Batch]:
    previous = None
    for batch in batches:
        if previous is not None:
            yield previous
        previous = batch
    if previous is not None:
        previous.epoch_end = True
        yield previous


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
