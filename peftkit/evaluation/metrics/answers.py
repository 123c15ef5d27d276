"""Metrics on answers as text: exact match, numeric match, JSON validity, JSON-Schema compliance.

Each is a count of successes over the examples seen, divided once at the end; with no examples
the value is ``None`` (undefined).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable
from typing import Any, ClassVar

from peftkit.evaluation.metrics.base import Metric, MetricContext, MetricResult, ratio, register_metric
from peftkit.evaluation.parsers import NumberParser, ParseError, extract_json, whole_json
from peftkit.evaluation.records import Prediction

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


class _Count(Metric):
    """``hits / total`` over examples."""

    def __init__(self, context: MetricContext) -> None:
        super().__init__(context)
        self.hits = self.total = 0

    def hit(self, prediction: Prediction) -> bool:
        raise NotImplementedError

    def update(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            self.check(p)
            self.hits += bool(self.hit(p))
            self.total += 1

    def compute(self) -> MetricResult:
        notes = [] if self.total else [f"no examples: {self.name} is undefined"]
        return MetricResult(
            {self.name: ratio(self.hits, self.total)}, {"hits": self.hits, "examples": self.total}, notes
        )


@register_metric("exact_match")
class ExactMatch(_Count):
    """The output text equals the reference text after normalisation (SQuAD's by default).

    Args:
        normalise: ``squad`` (lower case, no punctuation or articles, single spaces), ``strip``
            (surrounding whitespace only) or ``none``.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"reference"})

    def __init__(self, context: MetricContext, *, normalise: str = "squad") -> None:
        super().__init__(context)
        functions = {"squad": squad_normalise, "strip": str.strip, "none": lambda s: s}
        if normalise not in functions:
            raise ValueError(f"exact_match: normalise must be one of {sorted(functions)}, got {normalise!r}")
        self.normalise = functions[normalise]

    def hit(self, p: Prediction) -> bool:
        assert p.reference is not None
        return self.normalise(p.output) == self.normalise(p.reference)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@register_metric("numeric_match")
class NumericMatch(_Count):
    """The predicted number equals the reference number within a tolerance.

    ``|a - b| <= max(rel_tol · max(|a|, |b|), abs_tol)`` (as :func:`math.isclose`). Numbers are the
    parsed answers when the parser is ``number``, else the last number of each text (after a
    ``####`` marker if there is one). A prediction without a number is a miss; a reference without
    one is an error.

    Args:
        rel_tol: relative tolerance (default 0).
        abs_tol: absolute tolerance (default 1e-6).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"reference"})

    def __init__(self, context: MetricContext, *, rel_tol: float = 0.0, abs_tol: float = 1e-6) -> None:
        super().__init__(context)
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError(f"numeric_match: tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.reader = NumberParser()
        self.unparsed = 0

    def hit(self, p: Prediction) -> bool:
        assert p.reference is not None
        expected = p.expected if _is_number(p.expected) else None
        if expected is None:
            try:
                expected = self.reader.parse(p.reference)
            except ParseError:
                raise ValueError(f"numeric_match: the reference of example {p.index} holds no number") from None
        answer = p.answer if p.parsed and _is_number(p.answer) else None
        if answer is None:
            try:
                answer = self.reader.parse(p.output)
            except ParseError:
                self.unparsed += 1
                return False
        return math.isclose(float(answer), float(expected), rel_tol=self.rel_tol, abs_tol=self.abs_tol)

    def compute(self) -> MetricResult:
        result = super().compute()
        result.details["without_number"] = self.unparsed
        return result


@register_metric("json_validity")
class JsonValidity(_Count):
    """The output holds a JSON object or array (``strict``: the whole output is one JSON value)."""

    def __init__(self, context: MetricContext, *, strict: bool = False) -> None:
        super().__init__(context)
        self.strict = strict

    def hit(self, p: Prediction) -> bool:
        try:
            whole_json(p.output) if self.strict else extract_json(p.output)
        except ParseError:
            return False
        return True


@register_metric("schema_compliance")
class SchemaCompliance(_Count):
    """The output's JSON (as :class:`JsonValidity` finds it) validates against the JSON Schema.

    Invalid JSON is non-compliant. ``details`` count both failure kinds and keep the first few
    validation messages.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"schema"})

    def __init__(self, context: MetricContext, *, strict: bool = False) -> None:
        super().__init__(context)
        self.validator = schema_validator(context.schema)
        self.strict = strict
        self.invalid_json = self.violations = 0
        self.messages: list[str] = []

    def hit(self, p: Prediction) -> bool:
        try:
            value = whole_json(p.output) if self.strict else extract_json(p.output)
        except ParseError:
            self.invalid_json += 1
            return False
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is None:
            return True
        self.violations += 1
        if len(self.messages) < 5:
            where = "/".join(str(part) for part in error.absolute_path) or "(root)"
            self.messages.append(f"example {p.index}: {where}: {error.message}")
        return False

    def compute(self) -> MetricResult:
        result = super().compute()
        result.details.update(invalid_json=self.invalid_json, violations=self.violations, messages=self.messages)
        return result


def schema_validator(schema: Any) -> Any:
    """A ``jsonschema`` validator for ``schema`` (the draft its ``$schema`` names, else 2020-12)."""
    import jsonschema

    if not isinstance(schema, dict | bool):
        raise ValueError(f"a JSON Schema must be an object, got {type(schema).__name__}")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON Schema: {exc.message}") from None
    return cls(schema)
