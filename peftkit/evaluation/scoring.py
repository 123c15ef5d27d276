"""Likelihood scoring: how probable each candidate continuation (or the reference) is after a prompt.

No text is generated. With single-token candidates one forward per batch suffices (logits at the
last position only). Multi-token candidates and references are scored by the summed
log-probability of their tokens given the prompt, with the vocabulary projection computed only at
those tokens (``return_logits="labelled"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor

from peftkit.data.batching import Encoded, bucketed_order, collate, encode
from peftkit.device import model_device
from peftkit.methods.base import IGNORE_INDEX
from peftkit.progress import ProgressLog, progress_display


def progress_bar(enabled: bool) -> Progress | ProgressLog:
    """A transient progress bar on a terminal; off it, a plain line at intervals (a long evaluation in
    a log is not silent)."""
    return progress_display(enabled, transient=True, unit="examples")


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def on_model_device(model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` moved to the device of ``model``'s parameters (CPU or GPU)."""
    device = model_device(model)
    return {k: v.to(device) for k, v in batch.items()}


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of example indices with similar lengths (little padding), in a fixed order."""
    return bucketed_order(lengths, batch_size, seed=0)


@torch.no_grad()
def choice_log_likelihoods(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Encoded],
    choices: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "scoring",
) -> Tensor:
    """``(N, C)`` log p(choice | prompt) for every prompt and candidate continuation.

    ``model`` is a :class:`~peftkit.PeftModel` (logits aligned with the user's tokens). Prompts are
    text or already tokenised (:class:`~peftkit.data.batching.Encoded`); they are batched by length.
    """
    choice_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    if any(not ids for ids in choice_ids):
        raise ValueError(f"every choice must tokenise to at least one token: {list(choices)}")
    pad = pad_id(tokenizer)
    single = all(len(ids) == 1 for ids in choice_ids)
    encoded = [p if isinstance(p, Encoded) else encode(tokenizer, p) for p in prompts]
    scores = torch.empty(len(prompts), len(choices))
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for rows in length_batches([len(e) for e in encoded], batch_size):
            if single:
                batch = on_model_device(model, collate([encoded[i] for i in rows], pad))
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
                logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
                scores[rows] = logprobs[:, [ids[0] for ids in choice_ids]].cpu()
            else:
                for c, ids in enumerate(choice_ids):
                    examples = [continued(encoded[i], ids) for i in rows]
                    scores[rows, c] = sequence_log_likelihoods(model, collate(examples, pad))[0].float()
            bar.advance(task, len(rows))
    return scores


@torch.no_grad()
def reference_log_likelihoods(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Encoded],
    references: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "likelihood",
) -> tuple[Tensor, Tensor]:
    """``(N,)`` summed log p(reference tokens | prompt) and ``(N,)`` reference token counts.

    Each reference is tokenised as its own segment after the prompt, as in training.
    """
    pad = pad_id(tokenizer)
    ids = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    examples = [continued(p, r) for p, r in zip(prompts, ids, strict=True)]
    sums = torch.zeros(len(prompts), dtype=torch.float64)
    counts = torch.tensor([len(r) for r in ids])
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for rows in length_batches([len(e) for e in examples], batch_size):
            sums[rows] = sequence_log_likelihoods(model, collate([examples[i] for i in rows], pad))[0]
            bar.advance(task, len(rows))
    return sums, counts


def continued(prompt: Encoded, continuation: Sequence[int]) -> Encoded:
    """``prompt`` followed by ``continuation``, the continuation labelled."""
    return Encoded(prompt.input_ids + list(continuation), [IGNORE_INDEX] * len(prompt) + list(continuation))


def sequence_log_likelihoods(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(B,)`` summed log-probability of each row's labelled tokens, and ``(B,)`` their counts.

    Logits are computed only at the labelled positions: ``(T, V)`` for the ``T`` labelled targets
    in row-major order.
    """
    batch = on_model_device(model, batch)
    out = model(**batch, return_logits="labelled")
    following = batch["labels"][:, 1:]
    labelled = following != IGNORE_INDEX  # (B, L-1)
    targets = following[labelled]  # (T,)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = labelled.nonzero()[:, 0]  # the row of each target
    sums = torch.zeros(batch["labels"].shape[0], dtype=torch.float64).index_add_(0, rows, logprobs.double().cpu())
    return sums, labelled.sum(-1).cpu()
