"""Batched generation for evaluation: left-padded prompts through ``PeftModel.generate``.

Rows are grouped by prompt length (little padding) and decoded greedily by default. A row stops at
the end-of-sequence token or after ``max_new_tokens``; the text is then cut at the first ``stop``
string (generation itself does not look for stop strings, so a stop string saves no compute).

The settings are the one :class:`~peftkit.decoding.DecodingSettings` type. With a grammar in them
(or the ``grammar`` shorthand ``json`` / ``json_schema``) every row is constrained to compact JSON
(that follows the schema): a fresh llguidance logits processor per batch holds one grammar matcher per
row (:mod:`peftkit.grammar`). A row cut by ``max_new_tokens`` can still end mid-object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from peftkit.data.batching import Encoded, collate
from peftkit.decoding import DecodingSettings, Grammar
from peftkit.evaluation.scoring import length_batches, on_model_device, pad_id, progress_bar

GRAMMARS = ("json", "json_schema")
ANY_JSON = {"type": ["object", "array"]}
"""``grammar: json``: any JSON object or array."""


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
    if settings.grammar is not None and processors is None:
        processors = grammar_processors(tokenizer, model.get_output_embeddings().weight.shape[0], settings.grammar)
    plain = settings.model_copy(update={"grammar": None})  # the grammar travels as a processor
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for number, rows in enumerate(length_batches([len(p) for p in prompts], batch_size)):
            batch = on_model_device(model, collate([prompts[i] for i in rows], pad, padding_side="left"))
            seed = None if settings.seed is None else settings.seed + number
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pad_token_id=pad,
                logits_processor=processors() if processors else None,
                decoding=plain.model_copy(update={"seed": seed}),
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for row, tokens in zip(rows, new, strict=True):
                texts[row] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)
            bar.advance(task, len(rows))
    return texts


def as_grammar(grammar: str | Grammar | None, schema: Any = None) -> Grammar | None:
    """The :class:`Grammar` for evaluation's ``grammar`` shorthand (``json`` or ``json_schema``)."""
    if grammar is None or isinstance(grammar, Grammar):
        return grammar
    if grammar not in GRAMMARS:
        raise ValueError(f"grammar must be one of {', '.join(GRAMMARS)}, got {grammar!r}")
    if grammar == "json_schema":
        if schema is None:
            raise ValueError("grammar: json_schema needs prediction.schema")
        return Grammar(json_schema=schema)
    return Grammar(json_schema=ANY_JSON)


def grammar_processors(
    tokenizer: Any, vocab_size: int, grammar: str | Grammar, schema: Any = None
) -> Callable[[], list[Any]]:
    """A factory of llguidance logits processors constraining every row to ``grammar``.

    Raises:
        ValueError: an unknown shorthand, ``json_schema`` without a schema, or a grammar that does not compile.
    """
    from peftkit.grammar import GrammarLogitsProcessor, compile_grammar

    spec = as_grammar(grammar, schema)
    assert spec is not None
    compiled = compile_grammar(spec, tokenizer, vocab_size)
    return lambda: [GrammarLogitsProcessor(compiled)]
