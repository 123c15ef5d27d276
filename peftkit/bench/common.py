"""Helpers shared by the benchmarks: training one adapter, routed choice scoring, load average."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from peftkit.data.batching import collate, encode
from peftkit.evaluation.scoring import length_batches, on_model_device, pad_id
from peftkit.training.config import TrainingConfig
from peftkit.training.trainer import Trainer


def load_average() -> str:
    """``uptime``'s 1/5/15-minute load averages (every timed number is reported with them)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def rss_bytes() -> int:
    """This process's resident memory in bytes (Linux ``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def train(model: Any, data: Any, config: TrainingConfig, progress: bool = False) -> float:
    """Train ``model``'s trainable parameters on ``data``; returns the wall time in seconds."""
    start = time.perf_counter()
    Trainer(model, data, config, progress=progress).train()
    model.eval()
    return time.perf_counter() - start


def answer_ids(tokenizer: Any, answers: Sequence[str]) -> list[int]:
    """The first token of each answer (the answers are compared by their next-token logits)."""
    return [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]


@torch.no_grad()
def routed_predictions(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]],
    route: Callable[[Mapping[str, str]], Mapping[str, Any]],
    answers: Sequence[str],
    batch_size: int = 32,
) -> list[str]:
    """The answer each record gets: the one of ``answers`` whose first token is likeliest after the
    prompt, each row run with its own experts (``route(record)``) in one mixed batch."""
    ids = answer_ids(tokenizer, answers)
    encoded = [encode(tokenizer, r["prompt"]) for r in records]
    pad = pad_id(tokenizer)
    predicted: list[str] = [""] * len(records)
    for rows in length_batches([len(e) for e in encoded], batch_size):
        batch = on_model_device(model, collate([encoded[i] for i in rows], pad, "left"))
        batch.pop("labels")
        experts = [dict(route(records[i])) for i in rows]
        logits = model(**batch, experts=experts, logits_to_keep=1).logits[:, -1]  # (B, V)
        best = logits[:, ids].argmax(-1).tolist()
        for i, choice in zip(rows, best, strict=True):
            predicted[i] = answers[choice]
    return predicted


def per_group_accuracy(records: Sequence[Mapping[str, str]], predicted: Sequence[str], key: str) -> dict[str, float]:
    """Accuracy per value of ``records[i][key]`` (from counts of correct answers)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for record, answer in zip(records, predicted, strict=True):
        group = record[key]
        total[group] = total.get(group, 0) + 1
        right[group] = right.get(group, 0) + int(answer == record["completion"])
    return {group: right[group] / total[group] for group in total}
