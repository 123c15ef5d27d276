"""Batched generation for evaluation: left-padded prompts through ``PeftModel.generate``.

Rows are grouped by prompt length (little padding) and decoded greedily by default. A row stops at
the end-of-sequence token or after ``max_new_tokens``; the text is then cut at the first ``stop``
string (generation itself does not look for stop strings, so a stop string saves no compute).

With ``grammar`` (needs the optional ``xgrammar`` package) every row is constrained to valid JSON,
or to compact JSON that follows a schema: a fresh ``xgrammar`` logits processor per batch holds one
grammar matcher per row. A row cut by ``max_new_tokens`` can still end mid-object.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.data.batching import Encoded, collate
from peftkit.evaluation.scoring import length_batches, on_model_device, pad_id, progress_bar

GRAMMARS = ("json", "json_schema")


@dataclass(frozen=True)
class DecodingSettings:
    """How evaluation generates (greedy unless ``temperature > 0``).

    Attributes:
        max_new_tokens: the longest answer in tokens.
        temperature: 0 = greedy; above 0 samples.
        top_p / top_k: nucleus and top-k sampling (``temperature > 0`` only).
        seed: seeds sampling (each batch uses ``seed + batch index``), for reproducible samples.
        stop: cut the generated text at the first of these strings.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    positions = [p for p in (text.find(s) for s in stop) if p >= 0]
    return text[: min(positions)] if positions else text


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Encoded],
    settings: DecodingSettings,
    *,
    batch_size: int = 16,
    processors: Callable[[], list[Any]] | None = None,
    progress: bool = True,
    description: str = "generating",
) -> list[str]:
    """The generated continuation of every prompt, as text (special tokens removed).

    Args:
        processors: builds fresh logits processors for each batch (e.g. a grammar).
    """
    pad = pad_id(tokenizer)
    texts = [""] * len(prompts)
    sampling: dict[str, Any] = {"do_sample": False}
    if settings.temperature > 0:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        sampling["top_k"] = settings.top_k
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for number, rows in enumerate(length_batches([len(p) for p in prompts], batch_size)):
            batch = on_model_device(model, collate([prompts[i] for i in rows], pad, padding_side="left"))
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad,
                logits_processor=processors() if processors else None,
                seed=settings.seed + number,
                **sampling,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for row, tokens in zip(rows, new, strict=True):
                texts[row] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)
            bar.advance(task, len(rows))
    return texts


def grammar_processors(tokenizer: Any, vocab_size: int, grammar: str, schema: Any = None) -> Callable[[], list[Any]]:
    """A factory of ``xgrammar`` logits processors constraining every row to JSON (or to ``schema``).

    Raises:
        ValueError: ``xgrammar`` is not installed, or ``json_schema`` without a schema.
    """
    if grammar not in GRAMMARS:
        raise ValueError(f"grammar must be one of {', '.join(GRAMMARS)}, got {grammar!r}")
    try:
        import xgrammar as xgr
        import xgrammar.contrib.hf
    except ImportError:
        raise ValueError("grammar-constrained generation needs the xgrammar package: pip install xgrammar") from None
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info)
    if grammar == "json_schema":
        if schema is None:
            raise ValueError("grammar: json_schema needs prediction.schema")
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)  # compact JSON
    else:
        compiled = compiler.compile_builtin_json_grammar()
    return lambda: [xgrammar.contrib.hf.LogitsProcessor(compiled)]
