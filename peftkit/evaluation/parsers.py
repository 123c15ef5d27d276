"""Answer parsers: generated text → the answer a metric compares (a number, a label, a JSON value).

The same parser reads the reference, so ``"#### 1,234"`` in a GSM8K solution and ``"The answer is
1234."`` in a generation both become ``1234``. A parser raises :class:`ParseError` when the text
holds no answer; the prediction then counts as unparsed (wrong for accuracy, the ``(unparsed)``
column of the confusion matrix, invalid for JSON validity).

Register your own with ``register_parser("name", MyParser)``: a class whose keyword-only
constructor arguments are its options and whose ``parse(text)`` returns the answer.
"""

from __future__ import annotations

import inspect
import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class ParseError(ValueError):
    """The text holds no answer of the expected kind."""


class Parser:
    """Base class. ``labels`` is the label set for classification metrics (``None``: not a classifier)."""

    name: ClassVar[str] = ""
    labels: tuple[str, ...] | None = None

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def parse_reference(self, text: str) -> Any:
        """The expected answer from a reference completion (by default parsed like an output)."""
        return self.parse(text)


_PARSERS: dict[str, type[Parser]] = {}


def register_parser(name: str, cls: type[Parser] | None = None) -> Any:
    """Register a :class:`Parser` subclass under ``name`` (usable as a decorator)."""

    def add(parser_cls: type[Parser]) -> type[Parser]:
        if not (isinstance(parser_cls, type) and issubclass(parser_cls, Parser)):
            raise TypeError(f"register_parser({name!r}) takes a Parser subclass, got {parser_cls!r}")
        _PARSERS[name] = parser_cls
        return parser_cls

    return add(cls) if cls is not None else add


def known_parsers() -> list[str]:
    return sorted(_PARSERS)


def build_parser(name: str, **options: Any) -> Parser:
    """The parser ``name`` with its options; unknown names and options list what is known."""
    if name not in _PARSERS:
        raise ValueError(f"unknown parser {name!r}; known parsers: {', '.join(known_parsers())}")
    cls = _PARSERS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p, s in params.items() if s.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"parser {name!r} takes no option(s) {unknown}; it takes: {accepted or 'none'}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"parser {name!r} needs option(s) {missing} (prediction.parser_options)")
    return cls(**options)


# ---------------------------------------------------------------------- text
@register_parser("text")
class TextParser(Parser):
    """The output itself, without surrounding whitespace."""

    def __init__(self) -> None:
        pass

    def parse(self, text: str) -> str:
        return text.strip()


# ---------------------------------------------------------------------- numbers
_NUMBER = re.compile(
    r"(?<![\w.])"  # a number starts a token: not glued to a word ("x2") or a decimal point
    r"([-+\u2212]?)\s?\$?"  # sign (also the Unicode minus), then an optional dollar sign
    r"((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"  # 1,234.5 | 1234 | 3.14 | .5
    r"(?:[eE]([-+]?\d+))?"  # exponent
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def find_numbers(text: str) -> list[int | float]:
    """Every number in ``text``, in order: ``"-$1,234.50 and 7"`` → ``[-1234.5, 7]``."""
    numbers: list[int | float] = []
    for sign, digits, exponent in _NUMBER.findall(text):
        literal = digits.replace(",", "")
        negative = sign in ("-", "\u2212")
        if exponent or "." in literal:
            value: int | float = float(literal + (f"e{exponent}" if exponent else ""))
        else:
            value = int(literal)
        numbers.append(-value if negative else value)
    return numbers


@register_parser("number")
class NumberParser(Parser):
    """A numeric final answer, GSM8K-style.

    In order of precedence: the first number after the last ``marker`` (``####`` by default, as in
    GSM8K solutions); else the number in the last ``\\boxed{...}``; else the ``pick`` (last or
    first) number in the text. Thousands separators, a leading ``$``, signs, decimals and
    exponents are understood; a trailing ``.`` or ``%`` is not part of the number.

    Args:
        marker: the final-answer marker (``None``: none).
        pick: ``last`` (default: models usually conclude with the answer) or ``first``.
    """

    def __init__(self, *, marker: str | None = "####", pick: str = "last") -> None:
        if pick not in ("last", "first"):
            raise ValueError(f"number parser: pick must be 'last' or 'first', got {pick!r}")
        self.marker, self.pick = marker, pick

    def parse(self, text: str) -> int | float:
        if self.marker and self.marker in text:
            after = find_numbers(text.rsplit(self.marker, 1)[1])
            if after:
                return after[0]
        boxed = _BOXED.findall(text)
        if boxed:
            inside = find_numbers(boxed[-1])
            if inside:
                return inside[0]
        numbers = find_numbers(text)
        if not numbers:
            raise ParseError(f"no number in {text!r:.80}")
        return numbers[-1] if self.pick == "last" else numbers[0]


# ---------------------------------------------------------------------- labels
_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»…"


def normalise_label(text: str) -> str:
    """Case-folded, single-spaced, without punctuation at either end: ``" Positive!\\n"`` → ``"positive"``."""
    return " ".join(text.casefold().split()).strip(_EDGE_PUNCTUATION + " ")


@register_parser("label")
class LabelParser(Parser):
    """One label of a fixed set, matched after normalisation (case, spaces, edge punctuation).

    ``match: first`` (default) takes the whole output if it is a label (or an alias), else the
    label that occurs first as whole words (``"The sentiment is Negative."`` → ``negative``; at
    equal positions the longer alias wins). ``match: exact`` accepts only a whole-output match.
    Words are not understood: ``"not positive"`` reads as ``positive``.

    Args:
        labels: the label set, or ``{label: [alias, ...]}`` (each label is its own alias too).
        match: ``first`` or ``exact``.
    """

    def __init__(self, *, labels: Sequence[str] | Mapping[str, Sequence[str]], match: str = "first") -> None:
        if match not in ("first", "exact"):
            raise ValueError(f"label parser: match must be 'first' or 'exact', got {match!r}")
        aliases = dict(labels) if isinstance(labels, Mapping) else {label: [] for label in labels}
        if not aliases or isinstance(labels, str):
            raise ValueError(f"label parser: labels must be a non-empty list or mapping, got {labels!r}")
        self.labels = tuple(str(label) for label in aliases)
        self.match = match
        self.alias_of: dict[str, str] = {}
        for label, names in aliases.items():
            for alias in [label, *names]:
                key = normalise_label(str(alias))
                if not key:
                    raise ValueError(f"label parser: label or alias {alias!r} is empty after normalisation")
                if self.alias_of.get(key, label) != label:
                    raise ValueError(f"label parser: {alias!r} names both {self.alias_of[key]!r} and {label!r}")
                self.alias_of[key] = str(label)
        by_length = sorted(self.alias_of, key=len, reverse=True)
        self.pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(a) for a in by_length) + r")(?!\w)")

    def parse(self, text: str) -> str:
        normal = normalise_label(text)
        if normal in self.alias_of:
            return self.alias_of[normal]
        if self.match == "first":
            found = self.pattern.search(normal)
            if found:
                return self.alias_of[found.group(1)]
        raise ParseError(f"none of the labels {list(self.labels)} in {text!r:.80}")


# ---------------------------------------------------------------------- JSON
def extract_json(text: str, kind: str = "any") -> Any:
    """The first JSON object or array in ``text`` (prose and code fences around it are skipped).

    Each ``{`` (and ``[`` unless ``kind == "object"``) is tried in turn with a JSON decoder, so a
    stray brace before the real object does not hide it and braces inside strings are handled.
    """
    openers = "{" if kind == "object" else "[" if kind == "array" else "{["
    decoder = json.JSONDecoder()
    for position, char in enumerate(text):
        if char in openers:
            try:
                value, _ = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                continue
            return value
    raise ParseError(f"no JSON {'value' if kind == 'any' else kind} in {text!r:.80}")


_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.S)


def whole_json(text: str) -> Any:
    """``text`` parsed as one JSON value, allowing only surrounding whitespace or a code fence."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    try:
        return json.loads(fenced.group(1) if fenced else stripped)
    except json.JSONDecodeError as exc:
        raise ParseError(f"not a JSON document ({exc.msg}): {text!r:.80}") from None


@register_parser("json")
class JsonParser(Parser):
    """A JSON value: the first object/array in the text, or (``strict``) the whole text.

    Args:
        kind: ``any`` (object or array), ``object`` or ``array``.
        strict: the whole output (give or take whitespace and a code fence) must be the JSON value.
    """

    def __init__(self, *, kind: str = "any", strict: bool = False) -> None:
        if kind not in ("any", "object", "array"):
            raise ValueError(f"json parser: kind must be 'any', 'object' or 'array', got {kind!r}")
        self.kind, self.strict = kind, strict

    def parse(self, text: str) -> Any:
        if not self.strict:
            return extract_json(text, self.kind)
        value = whole_json(text)
        wanted = {"object": dict, "array": list, "any": (dict, list)}[self.kind]
        if not isinstance(value, wanted):
            raise ParseError(f"expected a JSON {self.kind}, got {type(value).__name__}")
        return value
