"""Evaluation metrics: a registry of accumulators (see :mod:`~peftkit.evaluation.metrics.base`).

Built in: ``accuracy``, ``precision``, ``recall``, ``f1``, ``confusion_matrix``
(classification.py); ``exact_match``, ``numeric_match``, ``json_validity``, ``schema_compliance``
(answers.py); ``mean_log_likelihood``, ``perplexity`` (likelihood.py).
"""

from peftkit.evaluation.metrics import answers, classification, likelihood
from peftkit.evaluation.metrics.base import (
    Metric,
    MetricContext,
    MetricResult,
    build_metric,
    known_metrics,
    metric_class,
    register_metric,
)
from peftkit.evaluation.metrics.classification import UNPARSED, ConfusionMatrix

__all__ = [
    "UNPARSED",
    "ConfusionMatrix",
    "Metric",
    "MetricContext",
    "MetricResult",
    "answers",
    "build_metric",
    "classification",
    "known_metrics",
    "likelihood",
    "metric_class",
    "register_metric",
]
