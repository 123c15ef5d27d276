"""Formatters: one data record → text *segments*, each marked as trained on or not.

A formatter never decides the loss mask by searching for a template string in the finished text.
It emits the prompt and the completion (or the turns of a chat) as separate segments; each segment
is tokenised on its own (:func:`peftkit.data.batching.encode_segments`), so the mask is exact::

    {"claim": "...", "evidence": [...], "label": "SUPPORT"}
        │  scifact formatter
        ▼
    [Segment("Claim: ...\\nEvidence: ...\\n\\nVerdict:"),  Segment(" SUPPORT", train=True)]
        │  encode_segments
        ▼
    input_ids = [p p p p p p ... c]      labels = [-100 ... -100 c]

Register your own with :func:`register_formatter`::

    @register_formatter("qa")
    def qa(record, *, question_field="q"):
        return record[question_field] + "\\nA:", " " + record["a"]     # (prompt, completion)

A formatter takes the record as a mapping and returns ``(prompt, completion)``, a list of
:class:`Segment`, or :class:`Formatted`. Options come from the config (``data.formatter_options``)
and must be keyword-only parameters. A formatter that needs the tokenizer (``chat``) declares a
``tokenizer`` parameter.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.data.rotten_tomatoes import PROMPT_TEMPLATE as SENTIMENT_TEMPLATE


@dataclass(frozen=True)
class Segment:
    """A piece of text; ``train=True`` puts its tokens under the loss."""

    text: str
    train: bool = False


@dataclass(frozen=True)
class Formatted:
    """A formatted record.

    Attributes:
        segments: the text pieces in order.
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to the first
            segment. Chat templates write their own, so ``chat`` sets it to ``False``.
    """

    segments: tuple[Segment, ...]
    add_special_tokens: bool = True


class FormatError(ValueError):
    """A record does not fit its formatter (a missing field, a wrong type)."""


Formatter = Callable[[Mapping[str, Any]], Formatted]

_FORMATTERS: dict[str, Callable[..., Any]] = {}


def register_formatter(name: str, fn: Callable[..., Any] | None = None) -> Any:
    """Register ``fn`` under ``name`` (usable as a decorator). Re-registering a name replaces it."""

    def add(function: Callable[..., Any]) -> Callable[..., Any]:
        if not name or not isinstance(name, str):
            raise ValueError(f"formatter name must be a non-empty string, got {name!r}")
        _FORMATTERS[name] = function
        return function

    return add(fn) if fn is not None else add


def known_formatters() -> list[str]:
    return sorted(_FORMATTERS)


def check_formatter(name: str, options: Mapping[str, Any]) -> Callable[..., Any]:
    """The registered function for ``name``, after checking ``options`` against its parameters.

    Raises:
        ValueError: unknown name (the message lists the known ones) or an option the formatter
            does not take (the message lists those it takes).
    """
    if name not in _FORMATTERS:
        raise ValueError(f"unknown formatter {name!r}; known formatters: {', '.join(known_formatters())}")
    function = _FORMATTERS[name]
    parameters = inspect.signature(function).parameters
    accepted = [p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"formatter {name!r} takes no option(s) {unknown}; it takes: {accepted or 'none'}")
    required = [
        p
        for p in accepted
        if parameters[p].default is inspect.Parameter.empty and p != "tokenizer" and p not in options
    ]
    if required:
        raise ValueError(f"formatter {name!r} needs option(s) {required} (data.formatter_options)")
    return function


def get_formatter(name: str, tokenizer: Any = None, **options: Any) -> Formatter:
    """The formatter ``name`` bound to its options, returning :class:`Formatted` for any record."""
    function = check_formatter(name, options)
    bound = functools.partial(function, **options)
    if "tokenizer" in inspect.signature(function).parameters:
        if tokenizer is None:
            raise ValueError(f"formatter {name!r} needs a tokenizer")
        bound = functools.partial(bound, tokenizer=tokenizer)

    def format_record(record: Mapping[str, Any]) -> Formatted:
        return as_formatted(bound(record), name)

    return format_record


def as_formatted(value: Any, name: str = "formatter") -> Formatted:
    """Normalise what a formatter returned: ``(prompt, completion)``, segments, or :class:`Formatted`."""
    if isinstance(value, Formatted):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return Formatted((Segment(value[0]), Segment(value[1], train=True)))
    if isinstance(value, Sequence) and value and all(isinstance(s, Segment) for s in value):
        return Formatted(tuple(value))
    raise FormatError(
        f"{name} returned {type(value).__name__}; expected (prompt, completion) strings, "
        "a list of Segment, or Formatted"
    )


def field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]`` with errors that name the field and what the record has."""
    if key not in record:
        raise FormatError(f"record has no field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise FormatError(f"field {key!r} must be {names}, got {type(value).__name__}: {value!r:.80}")
    return value


def label_text(value: Any, key: str) -> str:
    """A label as completion text: strings as they are, booleans and numbers spelled out."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise FormatError(f"field {key!r} must be a string, number or boolean label, got {type(value).__name__}")


# ---------------------------------------------------------------------- built-in formatters
@register_formatter("prompt_completion")
def prompt_completion(
    record: Mapping[str, Any], *, prompt_field: str = "prompt", completion_field: str = "completion"
) -> Formatted:
    """``{"prompt": ..., "completion": ...}``: the loss covers the completion."""
    return as_formatted((field(record, prompt_field), field(record, completion_field)))


@register_formatter("text")
def text(record: Mapping[str, Any], *, text_field: str = "text") -> Formatted:
    """Plain language modelling: every token of ``text`` is trained on (except the first, which
    nothing predicts)."""
    return Formatted((Segment(field(record, text_field), train=True),))


@register_formatter("template")
def template(record: Mapping[str, Any], *, prompt: str, completion: str) -> Formatted:
    """Python format strings over the record's fields, e.g. ``prompt: "Q: {question}\\nA:"``,
    ``completion: " {answer}"``."""
    try:
        return as_formatted((prompt.format_map(record), completion.format_map(record)))
    except KeyError as exc:
        raise FormatError(f"template names field {exc.args[0]!r}, which the record lacks ({sorted(record)})") from None


@register_formatter("rotten_tomatoes")
def sentiment(record: Mapping[str, Any], *, text_field: str = "text", label_field: str = "label") -> Formatted:
    """The demo's sentiment prompt: ``Review: {text}\\nIs this movie review positive or negative?
    Answer:`` → `` positive`` / `` negative``."""
    prompt = SENTIMENT_TEMPLATE.format(text=field(record, text_field))
    return as_formatted((prompt, " " + label_text(field(record, label_field, (str, bool)), label_field)))


@register_formatter("scifact")
def scifact(
    record: Mapping[str, Any],
    *,
    claim_field: str = "claim",
    evidence_field: str = "evidence",
    label_field: str = "label",
) -> Formatted:
    """Claim + evidence → verdict (SciFact): ``Claim: {claim}\\nEvidence: {evidence}\\n\\nVerdict:``
    → `` {label}``. ``evidence`` is a string or a list of sentences (joined with spaces)."""
    evidence = field(record, evidence_field, (str, list, tuple))
    if not isinstance(evidence, str):
        if not all(isinstance(s, str) for s in evidence):
            raise FormatError(f"field {evidence_field!r} must be a string or a list of strings")
        evidence = " ".join(evidence)
    prompt = f"Claim: {field(record, claim_field)}\nEvidence: {evidence}\n\nVerdict:"
    return as_formatted((prompt, " " + label_text(field(record, label_field, (str, bool, int)), label_field)))


@register_formatter("fever")
def fever(record: Mapping[str, Any], *, claim_field: str = "claim", label_field: str = "label") -> Formatted:
    """Claim → label (FEVER): ``Claim: {claim}\\n\\nVerify:`` → `` {label}`` (e.g. ``SUPPORTS``,
    ``REFUTES``, ``NOT ENOUGH INFO``; booleans become ``true``/``false``)."""
    prompt = f"Claim: {field(record, claim_field)}\n\nVerify:"
    return as_formatted((prompt, " " + label_text(field(record, label_field, (str, bool, int)), label_field)))


@register_formatter("gsm8k")
def gsm8k(record: Mapping[str, Any], *, question_field: str = "question", answer_field: str = "answer") -> Formatted:
    """Question → worked answer (GSM8K): ``Problem: {question}\\n\\nSolution:`` → `` {answer}``."""
    prompt = f"Problem: {field(record, question_field)}\n\nSolution:"
    return as_formatted((prompt, " " + label_text(field(record, answer_field, (str, int, float)), answer_field)))


@register_formatter("chat")
def chat(
    record: Mapping[str, Any], tokenizer: Any, *, messages_field: str = "messages", train_on: str = "assistant"
) -> Formatted:
    """Chat messages through the tokenizer's own chat template; loss on assistant turns.

    The conversation is rendered turn by turn: rendering ``messages[:i]`` (with the generation
    prompt before an assistant turn) and ``messages[:i+1]``; what turn ``i`` adds is its segment.
    Assistant contents (with the template's end-of-turn marker) are trained on; everything else,
    including the ``<|im_start|>assistant`` header, is context. A template whose rendering of a
    longer conversation does not extend the shorter one cannot be split this way and is rejected.

    Args:
        train_on: ``"assistant"`` (every assistant turn) or ``"last_assistant"`` (only the last).
    """
    if train_on not in ("assistant", "last_assistant"):
        raise FormatError(f"train_on must be 'assistant' or 'last_assistant', got {train_on!r}")
    messages = field(record, messages_field, list)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise FormatError(f"{messages_field}[{i}] must be a mapping with 'role' and 'content'")
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise FormatError(f"{messages_field} has no assistant turn to train on")
    trained = set(assistant_turns[-1:] if train_on == "last_assistant" else assistant_turns)

    def render(turns: list, generation_prompt: bool = False) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:i], generation_prompt=True)
            segments.append(Segment(_extension(done, header, i)))
            done = header
        full = render(messages[: i + 1])
        segments.append(Segment(_extension(done, full, i), train=i in trained))
        done = full
    return Formatted(tuple(s for s in segments if s.text), add_special_tokens=False)


def _extension(shorter: str, longer: str, turn: int) -> str:
    if not longer.startswith(shorter):
        raise FormatError(
            f"the tokenizer's chat template re-renders earlier turns when turn {turn} is added, so the "
            "conversation cannot be cut into segments; register a custom formatter for this model"
        )
    return longer[len(shorter) :]
