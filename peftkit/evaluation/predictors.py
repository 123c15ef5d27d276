"""Two ways to get predictions: score candidate labels, or generate and parse.

* :class:`ChoicePredictor` — classification without generation: the label whose continuation is
  most likely after the prompt (one forward per batch when every continuation is one token).
* :class:`GenerationPredictor` — generate (greedy by default, optionally grammar-constrained),
  then read the answer with a parser (number, label, JSON, text).

Both read the expected answer from each reference before any model runs, so a reference that
does not fit (a label outside the set, a solution without a number) fails at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from peftkit.data.batching import Encoded, encode_segments
from peftkit.evaluation.generation import DecodingSettings, generate_texts, grammar_processors
from peftkit.evaluation.parsers import LabelParser, ParseError, Parser
from peftkit.evaluation.records import EvalExample, Prediction
from peftkit.evaluation.scoring import choice_log_likelihoods, reference_log_likelihoods


class Predictor(Protocol):
    """Turns prompts into :class:`~peftkit.evaluation.records.Prediction` objects.

    Attributes:
        labels: the label set (classification), or ``None``.
        mode: what it does, for progress bars and reports (``choices`` or ``generate``).
    """

    labels: tuple[str, ...] | None
    mode: str

    def expected(self, reference: str) -> Any:
        """The answer a reference stands for; ``ValueError`` if it has none."""

    def predict(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Encoded],
        references: Sequence[str | None],
        *,
        likelihood: bool,
        batch_size: int,
        progress: bool,
        description: str,
    ) -> list[Prediction]:
        """Predictions for every prompt (``likelihood``: also score each reference)."""


def encode_prompts(
    tokenizer: Any, examples: Sequence[EvalExample], *, max_length: int | None = None, chat_template: bool = False
) -> list[Encoded]:
    """Tokenise each prompt as training does (segment by segment); the oldest tokens are dropped
    beyond ``max_length``. ``chat_template`` wraps the prompt as one user turn of the tokenizer's
    chat template, followed by the assistant header."""
    encoded = []
    for example in examples:
        if chat_template:
            turn = [{"role": "user", "content": example.prompt_text}]
            text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            segments, special = [(text, False)], False
        else:
            segments, special = [(s, False) for s in example.prompt], example.add_special_tokens
        encoded.append(encode_segments(tokenizer, segments, add_special_tokens=special, max_length=max_length))
    return encoded


class ChoicePredictor:
    """The label whose continuation has the highest log-likelihood after the prompt.

    Args:
        choices: the continuations (``[" positive", " negative"]``: labels are the stripped texts)
            or ``{label: continuation}``.
        scoring: ``sum`` (total log-probability) or ``mean`` (per token: does not favour short
            continuations when they differ in length).
    """

    def __init__(self, choices: Sequence[str] | Mapping[str, str], *, scoring: str = "sum") -> None:
        if scoring not in ("sum", "mean"):
            raise ValueError(f"choice scoring must be 'sum' or 'mean', got {scoring!r}")
        if isinstance(choices, str) or len(choices) < 2:
            raise ValueError(f"choices needs at least two candidates, got {choices!r}")
        mapping = dict(choices) if isinstance(choices, Mapping) else {c.strip(): c for c in choices}
        if len(mapping) != len(choices):
            raise ValueError(f"choices must name distinct labels, got {choices!r}")
        self.labels: tuple[str, ...] | None = tuple(mapping)
        self.mode = "choices"
        self.continuations = list(mapping.values())
        self.scoring = scoring
        self.reader = LabelParser(labels={label: [text] for label, text in mapping.items()}, match="exact")

    def expected(self, reference: str) -> str:
        try:
            return self.reader.parse(reference)
        except ParseError:
            raise ValueError(f"reference {reference!r} is none of the choices {list(self.labels or ())}") from None

    def predict(self, model, tokenizer, prompts, references, *, likelihood, batch_size, progress, description):
        scores = choice_log_likelihoods(
            model, tokenizer, prompts, self.continuations, batch_size=batch_size, progress=progress,
            description=description,
        )  # fmt: skip
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in self.continuations]
        ranked = scores / scores.new_tensor(lengths) if self.scoring == "mean" else scores
        assert self.labels is not None
        predictions = []
        for i, (row, reference) in enumerate(zip(ranked.argmax(-1).tolist(), references, strict=True)):
            p = Prediction(i, reference, self.labels[row], self.labels[row], scores=scores[i].tolist())
            if reference is not None:
                p.expected = self.expected(reference)
                if likelihood:  # the reference is the gold choice: its score is its log-likelihood
                    gold = self.labels.index(p.expected)
                    p.reference_logprob, p.reference_tokens = float(scores[i, gold]), lengths[gold]
            predictions.append(p)
        return predictions


class GenerationPredictor:
    """Generate, then parse the answer.

    Args:
        parser: reads the answer from the generated text and the expected answer from a reference.
        settings: decoding settings (greedy by default).
        grammar: ``json`` or ``json_schema`` to constrain decoding (llguidance); or give ``settings.grammar``.
        schema: the JSON Schema for ``json_schema``.
    """

    def __init__(
        self,
        parser: Parser,
        settings: DecodingSettings | None = None,
        *,
        grammar: str | None = None,
        schema: Any = None,
    ) -> None:
        self.parser, self.settings = parser, settings or DecodingSettings(max_new_tokens=32)
        self.labels = parser.labels
        self.mode = "generate"
        self.grammar, self.schema = grammar, schema
        self._processors: dict[int, Any] = {}

    def expected(self, reference: str) -> Any:
        try:
            return self.parser.parse_reference(reference)
        except ParseError as exc:
            raise ValueError(f"the reference has no answer the parser can read: {exc}") from None

    def processors(self, model: Any, tokenizer: Any) -> Any:
        if self.grammar is None:
            return None
        vocab = model.get_output_embeddings().weight.shape[0]
        key = id(tokenizer)
        if key not in self._processors:  # compiling is per tokenizer and vocabulary, not per batch
            self._processors[key] = grammar_processors(tokenizer, vocab, self.grammar, self.schema)
        return self._processors[key]

    def predict(self, model, tokenizer, prompts, references, *, likelihood, batch_size, progress, description):
        texts = generate_texts(
            model, tokenizer, prompts, self.settings, batch_size=batch_size,
            processors=self.processors(model, tokenizer), progress=progress, description=description,
        )  # fmt: skip
        predictions = []
        for i, (text, reference) in enumerate(zip(texts, references, strict=True)):
            try:
                p = Prediction(i, reference, text, self.parser.parse(text))
            except ParseError:
                p = Prediction(i, reference, text, None, parsed=False)
            if reference is not None:
                p.expected = self.expected(reference)
            predictions.append(p)
        if likelihood:
            scored = [i for i, r in enumerate(references) if r is not None]
            sums, counts = reference_log_likelihoods(
                model, tokenizer, [prompts[i] for i in scored], [references[i] for i in scored],  # type: ignore[misc]
                batch_size=batch_size, progress=progress, description=f"{description} (likelihood)",
            )  # fmt: skip
            for j, i in enumerate(scored):
                predictions[i].reference_logprob, predictions[i].reference_tokens = float(sums[j]), int(counts[j])
        return predictions
