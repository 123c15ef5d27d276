"""Classification metrics, all from one accumulated confusion matrix.

Rows are the gold labels, columns the predicted labels, plus one last column ``(unparsed)`` for
predictions that named no label of the set (a generation the label parser could not read)::

                 predicted
                 pos   neg   (unparsed)
    gold  pos  [  TP    FN      FN     ]
          neg  [  FP    TN      .      ]

For a class ``c``: ``TP = M[c, c]``, ``FP = Σ_r≠c M[r, c]``, ``FN = Σ_k≠c M[c, k]`` (unparsed
included), so

* ``precision_c = TP / (TP + FP)``, ``recall_c = TP / (TP + FN)``,
  ``F1_c = 2 TP / (2 TP + FP + FN)`` (equal to ``2 P R / (P + R)`` when both are defined);
* **macro** = the unweighted mean over the declared labels;
* **micro** = the same formulas on ``ΣTP, ΣFP, ΣFN`` over classes. With every prediction a label,
  micro precision = micro recall = micro F1 = accuracy; unparsed predictions lower micro recall
  and F1 but not micro precision (they predicted no class).

Conventions (as scikit-learn's ``zero_division=0``): a per-class value whose denominator is 0 (a
class never predicted has no precision; a class absent from the gold labels has no recall) is
reported as **0**, and the result's ``notes`` say which. With **no examples at all** every value is
``None`` (undefined): there is no evidence either way, and a target on it fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from peftkit.evaluation.metrics.base import Metric, MetricContext, MetricResult, ratio, register_metric
from peftkit.evaluation.records import Prediction

UNPARSED = "(unparsed)"


class ConfusionMatrix:
    """Counts of (gold label, predicted label) pairs over a fixed label set."""

    def __init__(self, labels: Sequence[str]) -> None:
        if len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"labels must be distinct and non-empty, got {list(labels)}")
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.counts = [[0] * (len(self.labels) + 1) for _ in self.labels]

    def add(self, gold: Any, predicted: Any, parsed: bool = True, where: str = "") -> None:
        if gold not in self.index:
            raise ValueError(f"{where}gold label {gold!r} is not one of the labels {self.labels}")
        column = self.index.get(predicted, len(self.labels)) if parsed else len(self.labels)
        self.counts[self.index[gold]][column] += 1

    @property
    def total(self) -> int:
        return sum(map(sum, self.counts))

    def true_positives(self, c: int) -> int:
        return self.counts[c][c]

    def predicted(self, c: int) -> int:
        """How often class ``c`` was predicted (``TP + FP``)."""
        return sum(row[c] for row in self.counts)

    def support(self, c: int) -> int:
        """How often class ``c`` is the gold label (``TP + FN``)."""
        return sum(self.counts[c])

    @property
    def unparsed(self) -> int:
        return sum(row[-1] for row in self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "columns": [*self.labels, UNPARSED], "matrix": [list(r) for r in self.counts]}


class ClassificationMetric(Metric):
    """Shared part: accumulate the confusion matrix of (expected, answer) label pairs."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference", "labels"})

    def __init__(self, context: MetricContext) -> None:
        super().__init__(context)
        assert context.labels is not None
        self.matrix = ConfusionMatrix(context.labels)

    def update(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            self.check(p)
            self.matrix.add(p.expected, p.answer, p.parsed, where=f"example {p.index}: ")


@register_metric("accuracy")
class Accuracy(Metric):
    """Fraction of examples whose parsed answer equals the parsed reference: ``correct / N``.

    Needs no label set, so it also scores numbers and JSON answers (exact equality of the parsed
    values); for classification it equals the confusion matrix's trace over ``N``.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"reference"})

    def __init__(self, context: MetricContext) -> None:
        super().__init__(context)
        self.correct = self.total = 0

    def update(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            self.check(p)
            self.correct += p.correct
            self.total += 1

    def compute(self) -> MetricResult:
        notes = [] if self.total else ["no examples: accuracy is undefined"]
        return MetricResult({"accuracy": ratio(self.correct, self.total)}, {"correct": self.correct}, notes)


def per_class(matrix: ConfusionMatrix, kind: str) -> tuple[list[float | None], int, int, list[str]]:
    """Per-class ``kind`` values (precision, recall or f1), the micro numerator and denominator, and notes."""
    values: list[float | None] = []
    notes: list[str] = []
    micro_num = micro_den = 0
    for c, label in enumerate(matrix.labels):
        tp, predicted, support = matrix.true_positives(c), matrix.predicted(c), matrix.support(c)
        if kind == "precision":
            num, den, why = tp, predicted, "never predicted"
        elif kind == "recall":
            num, den, why = tp, support, "absent from the gold labels"
        else:
            num, den, why = 2 * tp, predicted + support, "never predicted and absent from the gold labels"
        micro_num, micro_den = micro_num + num, micro_den + den
        if den == 0 and matrix.total:
            notes.append(f"{kind}/{label} is undefined ({label!r} {why}): reported as 0")
        values.append(None if not matrix.total else (num / den if den else 0.0))
    return values, micro_num, micro_den, notes


class _Averaged(ClassificationMetric):
    """Precision, recall or F1: per class, macro and micro (see the module docstring)."""

    kind: ClassVar[str]

    def value_names(self) -> list[str]:
        labels = self.context.labels or ()
        return [f"{self.kind}_macro", f"{self.kind}_micro", *(f"{self.kind}/{label}" for label in labels)]

    def compute(self) -> MetricResult:
        values, micro_num, micro_den, notes = per_class(self.matrix, self.kind)
        defined = [v for v in values if v is not None]
        result: dict[str, float | None] = {
            f"{self.kind}_macro": sum(defined) / len(defined) if defined else None,
            f"{self.kind}_micro": ratio(micro_num, micro_den) if self.matrix.total else None,
        }
        result.update({f"{self.kind}/{label}": v for label, v in zip(self.matrix.labels, values, strict=True)})
        if not self.matrix.total:
            notes = [f"no examples: {self.kind} is undefined"]
        supports = {label: self.matrix.support(c) for c, label in enumerate(self.matrix.labels)}
        return MetricResult(result, {"support": supports}, notes)


@register_metric("precision")
class Precision(_Averaged):
    kind = "precision"


@register_metric("recall")
class Recall(_Averaged):
    kind = "recall"


@register_metric("f1")
class F1(_Averaged):
    kind = "f1"


@register_metric("confusion_matrix")
class ConfusionMatrixMetric(ClassificationMetric):
    """The confusion matrix itself (a report table and plot; no scalar value)."""

    def value_names(self) -> list[str]:
        return []

    def compute(self) -> MetricResult:
        return MetricResult({}, {"confusion_matrix": self.matrix.to_dict()})
