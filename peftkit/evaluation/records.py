"""What flows through an evaluation: :class:`EvalExample` in, :class:`Prediction` out.

An example is a prompt (as the formatter's text segments, so it tokenises exactly as in training)
and the reference answer: the formatter's last trained segment. Everything after the prompt that
the model should produce is the reference; nothing is matched against template strings::

    {"text": "a triumph", "label": "positive"}
        │  rotten_tomatoes formatter
        ▼
    [Segment("Review: a triumph\\nIs this ... Answer:"),  Segment(" positive", train=True)]
        │  examples_from_records
        ▼
    EvalExample(prompt=("Review: a triumph\\nIs this ... Answer:",), reference=" positive")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peftkit.data.formatters import FormatError, Formatted


@dataclass(frozen=True)
class EvalExample:
    """One evaluation example.

    Attributes:
        prompt: the prompt's text segments (tokenised one by one, as in training).
        reference: the expected completion (``None``: the formatter produced none; metrics that
            compare against a reference then refuse to run).
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to the first segment.
    """

    prompt: tuple[str, ...]
    reference: str | None = None
    add_special_tokens: bool = True

    @classmethod
    def from_text(cls, prompt: str, reference: str | None = None) -> EvalExample:
        return cls((prompt,), reference)

    @property
    def prompt_text(self) -> str:
        return "".join(self.prompt)


@dataclass
class Prediction:
    """What one variant predicted for one example, with everything the metrics read.

    Attributes:
        index: the example's position in the evaluated list.
        reference: the reference completion as text (``None`` if there is none).
        output: the prediction as text: the chosen label (choices mode) or the generated text.
        answer: the parsed prediction (a label, a number, a JSON value, ...); meaningful only
            when ``parsed`` is true.
        parsed: the parser found an answer in ``output``.
        expected: the parsed reference (``None`` when there is no reference).
        scores: choices mode: ``log p(choice | prompt)`` per candidate, in the choices' order.
        reference_logprob: summed ``log p(reference tokens | prompt)`` (when a likelihood metric asks).
        reference_tokens: how many tokens that sum covers.
    """

    index: int
    reference: str | None
    output: str
    answer: Any = None
    parsed: bool = True
    expected: Any = None
    scores: list[float] | None = None
    reference_logprob: float | None = None
    reference_tokens: int | None = None

    @property
    def correct(self) -> bool:
        """The parsed answer equals the parsed reference (an unparsed answer is never correct)."""
        return self.parsed and self.reference is not None and self.answer == self.expected

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": self.index,
            "reference": self.reference,
            "output": self.output,
            "answer": self.answer if self.parsed else None,
            "parsed": self.parsed,
            "expected": self.expected,
            "correct": self.correct,
        }
        if self.scores is not None:
            record["scores"] = [round(s, 6) for s in self.scores]
        if self.reference_logprob is not None:
            record["reference_logprob"] = round(self.reference_logprob, 6)
            record["reference_tokens"] = self.reference_tokens
        return record


def split_formatted(formatted: Formatted) -> EvalExample:
    """Prompt = every segment before the last trained one; reference = the last trained segment.

    Segments after the reference (e.g. a chat template's closing newline) are not part of the
    answer and are dropped. Without a trained segment the whole text is the prompt.
    """
    segments = [s for s in formatted.segments if s.text]
    trained = [i for i, s in enumerate(segments) if s.train]
    if not trained:
        return EvalExample(tuple(s.text for s in segments), None, formatted.add_special_tokens)
    last = trained[-1]
    prompt = tuple(s.text for s in segments[:last])
    if not prompt:
        raise FormatError("the record has nothing before its answer to prompt with (the first segment is trained)")
    return EvalExample(prompt, segments[last].text, formatted.add_special_tokens)


def examples_from_records(
    records: Iterable[Mapping[str, Any]], formatter: Callable[[Mapping[str, Any]], Formatted], name: str = "data"
) -> list[EvalExample]:
    """Format every record into an :class:`EvalExample`; a bad record is an error naming its index."""
    examples = []
    for index, record in enumerate(records):
        try:
            examples.append(split_formatted(formatter(record)))
        except (FormatError, ValueError) as exc:
            raise ValueError(f"{name}: record {index}: {exc}") from None
    return examples
