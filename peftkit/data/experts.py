"""Many experts' data in one run: each expert's batches exactly as a run of its own would read them.

Records carry the expert they belong to (``expert_field``, e.g. ``persona``) and, optionally, other
routing keys (``cluster``). Each expert's records form their own :class:`TokenizedData` with the
run's batch size and seed, so expert ``e``'s ``k``-th batch is the batch its own run would take at
step ``k`` (same shuffle, same length bucketing, epochs one after another). Optimiser step ``k`` of
the joint run holds the ``k``-th batch of every expert that still has steps, cut into micro-batches
of at most ``micro_batch_size`` rows (one forward pass each), the step's rows sorted by length first
so that rows of similar length share a micro-batch (less padding; the update is per step, so the
grouping does not change it)::

    step k:  [e0 batch k][e1 batch k] ... [eN batch k]  ──►  by length ──►  micro-batches of ≤ micro_batch_size rows

Each row carries its route (adapter name → expert id) so the model applies that row's experts.
An expert runs out after as many steps as its own run has; the joint run ends with the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from peftkit.data.batching import collate
from peftkit.data.pipeline import Batch, DataPosition, TokenizedData, shard
from peftkit.data.sources import MemorySource, RecordSource
from peftkit.methods.base import IGNORE_INDEX

Route = dict[str, Any]


class ExpertData:
    """Training batches for many experts at once (see the module docstring).

    Args:
        source: the records, every one with ``expert_field``.
        formatter, tokenizer, batch_size, max_length, truncation, padding_side, shuffle, seed,
            bucket_window: as for :class:`TokenizedData`, applied to each expert's records alone.
        route: ``record -> {adapter name: expert id}``: what each row applies (e.g. the unified
            LoRA, its cluster prompt and its own persona prompt).
        expert_field: the record field naming the expert.
        micro_batch_size: rows per forward pass (default: ``batch_size``).
        rank, world_size: this process's share of every micro-batch (as :class:`TokenizedData`).
    """

    def __init__(
        self,
        source: RecordSource,
        formatter: Callable[[Mapping[str, Any]], Any],
        tokenizer: Any,
        *,
        route: Callable[[Mapping[str, Any]], Route],
        expert_field: str = "expert",
        batch_size: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        name: str = "data",
        **options: Any,
    ) -> None:
        grouped: dict[str, list[dict[str, Any]]] = {}
        for index, record in enumerate(source):
            if expert_field not in record or record[expert_field] in (None, ""):
                raise ValueError(f"{name}: record {index} of {source.name} has no {expert_field!r} field")
            grouped.setdefault(str(record[expert_field]), []).append(dict(record))
        if not grouped:
            raise ValueError(f"{name}: {source.name} has no records")
        self.expert_field, self.batch_size, self.name = expert_field, batch_size, name
        self.micro_batch_size = micro_batch_size or batch_size
        self.rank, self.world_size = rank, world_size
        self.source = source
        self.routes = {expert: route(records[0]) for expert, records in grouped.items()}
        self.experts: dict[str, TokenizedData] = {}
        for expert, records in grouped.items():
            own = MemorySource(records, name=f"{source.name} [{expert_field}={expert}]")
            label = f"{name} ({expert_field}={expert})"
            data = TokenizedData(own, formatter, tokenizer, batch_size=batch_size, name=label, **options)
            self.experts[expert] = data
        self.pad_token_id = next(iter(self.experts.values())).pad_token_id
        self.padding_side = options.get("padding_side", "left")
        self.streaming = False

    def batches_per_epoch(self) -> dict[str, int]:
        """Each expert's batches in one of its epochs."""
        return {expert: data.batches_per_epoch() or 0 for expert, data in self.experts.items()}

    def steps(self, epochs: int | None, max_steps: int | None) -> dict[str, int]:
        """Each expert's optimiser steps, as many as a run of its own takes."""
        from peftkit.training.experts import steps_alone

        return {e: steps_alone(n, epochs, max_steps) for e, n in self.batches_per_epoch().items()}

    @property
    def stats(self) -> Any:
        """Counts over every expert's data (examples kept, dropped)."""
        parts = [d.stats for d in self.experts.values()]
        first = parts[0]
        merged = type(first)()
        for field in ("records", "examples", "dropped_too_long", "dropped_unlabelled", "tokens", "label_tokens"):
            setattr(merged, field, sum(getattr(p, field) for p in parts))
        return merged

    def batches(self, steps: dict[str, int], start: DataPosition | None = None) -> Iterator[Batch]:
        """Micro-batches of every step from ``start`` (``start.batch`` = steps already taken); the
        last micro-batch of a step has ``step_end``; ends after the longest expert's last step."""
        done = start.batch if start is not None else 0
        streams = {e: data.batches() for e, data in self.experts.items()}
        for expert, stream in streams.items():  # skip what earlier steps consumed
            for _ in range(min(done, steps[expert])):
                next(stream)
        for step in range(done, max(steps.values())):
            rows: list[tuple[Any, Route]] = []
            for expert, stream in streams.items():
                if step < steps[expert]:
                    batch = next(stream)
                    rows.extend(self._rows(batch, self.routes[expert]))
            rows.sort(key=lambda row: len(row[0]))  # similar lengths share a micro-batch: less padding
            chunks = [rows[i : i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
            for number, chunk in enumerate(chunks):
                micro = self._micro(chunk, DataPosition(0, 0, step + 1))
                micro.step_end = number == len(chunks) - 1
                yield micro

    def _rows(self, batch: Batch, route: Route) -> list[tuple[Any, Route]]:
        """The examples of one expert's batch (decoded back from its tensors) with the route."""
        from peftkit.data.batching import Encoded

        tensors = batch.tensors
        out = []
        for ids, mask, labels in zip(tensors["input_ids"], tensors["attention_mask"], tensors["labels"], strict=True):
            keep = mask.bool()
            out.append((Encoded(ids[keep].tolist(), labels[keep].tolist()), route))
        return out

    def _micro(self, chunk: list[tuple[Any, Route]], position: DataPosition) -> Batch:
        mine = shard(chunk, self.rank, self.world_size)
        if not mine:
            import torch

            empty = torch.zeros((0, 0), dtype=torch.long)
            tensors = {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
            return Batch(tensors, 0, 0, position, routes=[])
        tensors = collate([e for e, _ in mine], self.pad_token_id, self.padding_side)
        labels = tensors["labels"]
        return Batch(
            tensors,
            int(tensors["attention_mask"].sum()),
            int((labels[:, 1:] != IGNORE_INDEX).sum()),
            position,
            routes=[r for _, r in mine],
        )
