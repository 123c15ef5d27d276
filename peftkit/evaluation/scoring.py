"""Classification by likelihood: score each candidate label's tokens after the prompt.

No text is generated. For single-token candidates one forward per batch suffices (logits at the
last position only); multi-token candidates are scored by the summed log-probability of their
tokens given the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor

from peftkit.data.batching import Encoded, bucketed_order, collate, encode


@torch.no_grad()
def choice_log_likelihoods(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "scoring",
) -> Tensor:
    """``(N, C)`` log p(choice | prompt) for every prompt and candidate continuation.

    ``model`` is a :class:`~peftkit.PeftModel` (or any callable returning user-aligned logits).
    Prompts are batched by length to avoid padding work.
    """
    choice_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    if any(not ids for ids in choice_ids):
        raise ValueError(f"every choice must tokenise to at least one token: {list(choices)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    single = all(len(ids) == 1 for ids in choice_ids)
    encoded = [encode(tokenizer, p) for p in prompts]
    scores = torch.empty(len(prompts), len(choices))
    order = [i for batch in bucketed_order([len(e) for e in encoded], batch_size, seed=0) for i in batch]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if single:
                batch = collate([encoded[i] for i in rows], pad)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
                logits = out.logits[:, -1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                scores[rows] = logprobs[:, [ids[0] for ids in choice_ids]].cpu()
            else:
                for c, ids in enumerate(choice_ids):
                    examples = [Encoded(encoded[i].input_ids + ids, [-100] * len(encoded[i]) + ids) for i in rows]
                    scores[rows, c] = _sequence_log_likelihood(model, collate(examples, pad))
            bar.advance(task, len(rows))
    return scores


def _sequence_log_likelihood(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """``(B,)`` summed log-probability of each row's labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1).cpu()
