"""The metric protocol and the registry.

A metric **accumulates counts** over predictions (``update``, any number of times, batch after
batch) and computes its values **once** from those counts (``compute``). Nothing is averaged per
batch: accuracy is ``correct / total`` over every example seen, F1 comes from the summed confusion
matrix, perplexity from the summed log-probabilities and token counts. So the result does not
depend on how the examples were batched.

Register your own metric, either as a class::

    @register_metric("citation_accuracy")
    class CitationAccuracy(Metric):
        needs = frozenset({"reference"})
        def __init__(self, context, *, strict=False): ...
        def update(self, predictions): ...          # accumulate counts
        def compute(self) -> MetricResult: ...      # values from the counts

or as a function of one prediction, averaged over all examples (a sum and a count)::

    @register_metric("mentions_plot")
    def mentions_plot(prediction) -> float:
        return float("plot" in prediction.output)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.evaluation.records import Prediction

NEEDS = ("reference", "labels", "likelihood", "schema")
"""What a metric may need: reference answers, a label set, reference log-likelihoods, a JSON Schema."""


@dataclass(frozen=True)
class MetricContext:
    """What a metric knows about the task before it sees a prediction.

    Attributes:
        labels: the label set of a classification task (``None`` if the task has none).
        schema: the JSON Schema outputs must follow (``None`` if none was given).
    """

    labels: tuple[str, ...] | None = None
    schema: dict[str, Any] | None = None


@dataclass
class MetricResult:
    """A metric's values.

    Attributes:
        values: scalar values by key (``accuracy``, ``f1_macro``, ``f1/positive``, ...);
            ``None`` = undefined (e.g. no examples).
        details: anything non-scalar worth reporting (a confusion matrix, supports, counts).
        notes: conventions that were applied (e.g. an undefined precision reported as 0).
    """

    values: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Metric:
    """Base class: accumulate counts in :meth:`update`, compute values in :meth:`compute`.

    Attributes:
        name: the registered name.
        needs: a subset of :data:`NEEDS`; checked when the metric is built and as it runs.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, context: MetricContext) -> None:
        self.context = context
        if "labels" in self.needs and not context.labels:
            raise ValueError(
                f"metric {self.name!r} needs a label set: score choices (prediction.choices) or parse labels "
                "(prediction.parser: label with labels)"
            )
        if "schema" in self.needs and context.schema is None:
            raise ValueError(f"metric {self.name!r} needs a JSON Schema (prediction.schema)")

    def value_names(self) -> list[str]:
        """The scalar value names :meth:`compute` returns (what targets and early stopping may name)."""
        return [self.name]

    def update(self, predictions: Iterable[Prediction]) -> None:
        raise NotImplementedError

    def compute(self) -> MetricResult:
        raise NotImplementedError

    def check(self, prediction: Prediction) -> None:
        """Refuse a prediction that lacks what this metric needs."""
        if "reference" in self.needs and prediction.reference is None:
            raise ValueError(
                f"metric {self.name!r} compares with a reference answer, but example {prediction.index} has none "
                "(its formatter produced no completion)"
            )
        if "likelihood" in self.needs and prediction.reference_logprob is None:
            raise ValueError(f"metric {self.name!r}: example {prediction.index} has no reference log-likelihood")


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or ``None`` (undefined) when there is nothing to divide by."""
    return numerator / denominator if denominator else None


class FunctionMetric(Metric):
    """A registered function of one prediction, averaged over every example: ``Σ f(p) / N``."""

    function: ClassVar[Callable[[Prediction], float]]

    def __init__(self, context: MetricContext) -> None:
        super().__init__(context)
        self.total = 0.0
        self.count = 0

    def update(self, predictions: Iterable[Prediction]) -> None:
        for prediction in predictions:
            self.check(prediction)
            self.total += float(type(self).function(prediction))
            self.count += 1

    def compute(self) -> MetricResult:
        return MetricResult({self.name: ratio(self.total, self.count)}, {"examples": self.count})


_METRICS: dict[str, type[Metric]] = {}


def register_metric(
    name: str, metric: type[Metric] | Callable[[Prediction], float] | None = None, *, needs: Sequence[str] = ()
) -> Any:
    """Register a :class:`Metric` subclass or a per-example function under ``name`` (usable as a decorator).

    Args:
        needs: for a function: what it reads (``reference``, ``likelihood``, ...); a class declares
            its own ``needs``.
    """
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"register_metric({name!r}): unknown needs {unknown}; known: {', '.join(NEEDS)}")

    def add(obj: Any) -> Any:
        if not name or not isinstance(name, str) or "/" in name:
            raise ValueError(f"metric name must be a non-empty string without '/', got {name!r}")
        if isinstance(obj, type) and issubclass(obj, Metric):
            if not obj.name:
                obj.name = name
            cls = obj if obj.name == name else type(obj.__name__, (obj,), {"name": name})  # one class, two names
        elif callable(obj):
            body = {"name": name, "needs": frozenset(needs), "function": staticmethod(obj), "__doc__": obj.__doc__}
            cls = type(f"{name}_metric", (FunctionMetric,), body)
        else:
            raise TypeError(f"register_metric({name!r}) takes a Metric subclass or a function, got {obj!r}")
        _METRICS[name] = cls
        return obj

    return add(metric) if metric is not None else add


def known_metrics() -> list[str]:
    return sorted(_METRICS)


def metric_class(name: str) -> type[Metric]:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(known_metrics())}")
    return _METRICS[name]


def build_metric(name: str, context: MetricContext, options: dict[str, Any] | None = None) -> Metric:
    """A fresh metric; unknown names and options are errors that list what is known."""
    cls = metric_class(name)
    options = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p, s in params.items() if s.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"metric {name!r} takes no option(s) {unknown}; it takes: {accepted or 'none'}")
    return cls(context, **options)
