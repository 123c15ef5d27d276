"""Grammar-constrained decoding with llguidance: JSON Schema and GBNF.

At each step the matcher computes which tokens may come next; every other token's score is set to
``-inf`` before sampling, so the output is in the grammar's language whatever the temperature.
When the grammar is complete the only allowed token is end-of-sequence.

llguidance (3 MB, no dependencies) is a core dependency; xgrammar would pull triton (~290 MB) on
Linux x86-64. One :class:`CompiledGrammar` serves any number of requests; each row of a batch has
its own :class:`GrammarMatcher`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from peftkit.decoding import Grammar

__all__ = ["CompiledGrammar", "GrammarLogitsProcessor", "GrammarMatcher", "compile_grammar", "grammar_text"]


def grammar_text(grammar: Grammar) -> str:
    """The llguidance grammar for ``grammar`` (compact JSON for schemas: no free whitespace).

    Raises:
        ValueError: the GBNF does not parse (the message says why).
    """
    import llguidance as llg

    if grammar.json_schema is not None:
        return llg.LLMatcher.grammar_from_json_schema(
            json.dumps(grammar.json_schema), overrides={"whitespace_flexible": False}
        )
    try:
        return llg.grammar_from("gbnf", grammar.gbnf or "")
    except Exception as exc:  # llguidance raises bare Exceptions from its converter
        raise ValueError(f"grammar.gbnf does not compile: {exc}") from None


@lru_cache(maxsize=8)
def _tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


class CompiledGrammar:
    """A checked grammar bound to one tokenizer; :meth:`matcher` starts a fresh match."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int) -> None:
        import llguidance as llg

        self.grammar, self.vocab_size = grammar, vocab_size
        self.eos_token_id = tokenizer.eos_token_id
        self.info = _tokenizer_info(tokenizer, vocab_size)
        self.text = grammar_text(grammar)
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(self.text, self.info)
        if failed:
            raise ValueError(f"grammar ({grammar.kind}) does not compile: {messages[0]}")

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


def compile_grammar(grammar: Grammar, tokenizer: Any, vocab_size: int) -> CompiledGrammar:
    """Check and compile ``grammar`` for ``tokenizer`` (a fast Hugging Face tokenizer)."""
    return CompiledGrammar(grammar, tokenizer, vocab_size)


class GrammarMatcher:
    """Follows one sequence through the grammar."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        import llguidance as llg

        self.vocab_size, self.eos_token_id = compiled.vocab_size, compiled.eos_token_id
        self._matcher = llg.LLMatcher(compiled.info, compiled.text, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"grammar does not compile: {self._matcher.get_error()}")

    def allowed(self) -> Tensor:
        """``(V,)`` bool: the tokens the grammar allows next (only end-of-sequence once it is complete)."""
        if self._matcher.is_stopped():
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[self.eos_token_id] = True
            return allowed
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.shape[0])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return allowed

    def mask(self, scores: Tensor) -> Tensor:
        """``scores`` ``(V,)`` with every token the grammar forbids at ``-inf``."""
        allowed = self.allowed().to(scores.device)
        return scores.masked_fill(~allowed[: scores.shape[-1]], float("-inf"))

    def accept(self, token: int) -> None:
        if self._matcher.is_stopped():  # complete: end-of-sequence (or generate's padding) follows
            return
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher refused token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped()


class GrammarLogitsProcessor:
    """A ``(input_ids, scores) -> scores`` processor for batched ``generate``: one matcher per row.

    The first call fixes the prompt length; later calls feed each row's newest token to its matcher.
    A row whose grammar is complete may only end (``generate`` pads it afterwards; the pad token is
    not fed to its matcher).
    """

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.compiled = compiled
        self.matchers: list[GrammarMatcher] | None = None
        self.start = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.matchers is None:
            self.matchers = [self.compiled.matcher() for _ in range(input_ids.shape[0])]
            self.start = input_ids.shape[1]
        elif input_ids.shape[1] > self.start:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist(), strict=True):
                matcher.accept(token)
        return torch.stack([m.mask(row) for m, row in zip(self.matchers, scores, strict=True)])
