"""Quality targets: ``metric op value`` statements checked against a report.

Written as strings or mappings::

    targets:
      - f1_macro >= 0.8
      - "schema_compliance >= 95%"              # a percentage is divided by 100
      - {metric: perplexity, op: "<", value: 12, variants: [tuned]}

Operators: ``>=``, ``>``, ``<=``, ``<``. A target names a scalar metric value (``accuracy``,
``f1_macro``, ``f1/positive``, ...). By default it applies to every variant except the base model
(the zero-shot baseline is there for comparison); when the base model is the only variant, to it.
An undefined value (no examples) fails its target.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_TARGET = re.compile(
    r"^\s*(?P<metric>[^\s<>=!]+)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<pct>%?)\s*$"
)


@dataclass(frozen=True)
class Target:
    """``metric op value``, optionally only for some variants."""

    metric: str
    op: str
    value: float
    variants: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"target {self.metric}: operator {self.op!r} is not one of {', '.join(OPERATORS)}")
        if not math.isfinite(self.value):
            raise ValueError(f"target {self.metric}: value must be a finite number, got {self.value}")

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def holds(self, value: float | None) -> bool:
        return value is not None and math.isfinite(value) and OPERATORS[self.op](value, self.value)


def parse_target(spec: str | Mapping[str, Any] | Target) -> Target:
    """A :class:`Target` from ``"f1_macro >= 0.8"`` or ``{metric, op, value[, variants]}``."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        match = _TARGET.match(spec)
        if not match:
            raise ValueError(
                f"target {spec!r} must look like 'metric op value' with op one of {', '.join(OPERATORS)} "
                "(e.g. 'f1_macro >= 0.8' or 'accuracy >= 80%')"
            )
        value = float(match["value"]) / (100 if match["pct"] else 1)
        return Target(match["metric"], match["op"], value)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"metric", "op", "value", "variants"})
        missing = [k for k in ("metric", "op", "value") if k not in spec]
        if unknown or missing:
            raise ValueError(
                f"target {dict(spec)!r}: needs metric, op, value (and optionally variants)"
                + (f"; unknown key(s) {unknown}" if unknown else "")
            )
        variants = spec.get("variants")
        if isinstance(variants, str):
            variants = [variants]
        value = spec["value"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"target {spec['metric']}: value must be a number, got {value!r}")
        return Target(str(spec["metric"]), str(spec["op"]), float(value), tuple(variants) if variants else None)
    raise ValueError(f"a target is a string like 'f1_macro >= 0.8' or a mapping, got {spec!r}")


def check_targets(targets: Sequence[Target], known_keys: Sequence[str], variants: Sequence[str] | None = None) -> None:
    """Fail before any model runs if a target names an unknown metric value (or, when ``variants`` is
    given, an unknown variant)."""
    problems = []
    for target in targets:
        if target.metric not in known_keys:
            problems.append(
                f"target {target.text!r}: no metric reports {target.metric!r}; "
                f"the configured metrics report: {', '.join(known_keys) or 'nothing'}"
            )
        unknown = sorted(set(target.variants or ()) - set(variants)) if variants is not None else []
        if unknown:
            problems.append(
                f"target {target.text!r}: unknown variant(s) {unknown}; variants: {', '.join(variants or ())}"
            )
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class TargetResult:
    """One target checked on one variant."""

    target: Target
    variant: str
    value: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.text, "variant": self.variant, "value": self.value, "passed": self.passed}


def applies_to(target: Target, variant: str, is_base: bool, only_base: bool) -> bool:
    if target.variants is not None:
        return variant in target.variants
    return not is_base or only_base


def evaluate_targets(
    targets: Sequence[Target], values: Mapping[str, Mapping[str, float | None]], base_variants: Sequence[str] = ()
) -> list[TargetResult]:
    """Check every target on the variants it applies to; ``values`` is variant → metric key → value."""
    only_base = all(v in base_variants for v in values)
    results = []
    for target in targets:
        for variant, metrics in values.items():
            if applies_to(target, variant, variant in base_variants, only_base):
                value = metrics.get(target.metric)
                results.append(TargetResult(target, variant, value, target.holds(value)))
    return results
