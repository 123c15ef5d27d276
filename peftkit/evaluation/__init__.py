"""Evaluation: predictions (likelihood scoring or generation + parsing), metrics from accumulated
counts, quality targets, comparisons of the base model and adapters, and reports.

::

    examples ──► Predictor ──► Prediction per example ──► Metric.update (counts) ──► Metric.compute
    (prompt,     (choices or        (output, parsed                                    │
     reference)   generate+parse)    answer, scores)            targets ◄──────────────┘
                                                                   │
                                          EvaluationReport ◄───────┘ ──► JSON, Markdown, PNG

Names are imported lazily, so ``peftkit.evaluation.config`` (what the training config uses) loads
without torch-heavy modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ACTIVE": "evaluator",
    "Evaluation": "evaluator",
    "compare_choices": "evaluator",
    "variant_scope": "evaluator",
    "EvaluationReport": "report",
    "VariantResult": "report",
    "EvalExample": "records",
    "Prediction": "records",
    "examples_from_records": "records",
    "ChoicePredictor": "predictors",
    "GenerationPredictor": "predictors",
    "DecodingSettings": "generation",
    "Metric": "metrics",
    "MetricContext": "metrics",
    "MetricResult": "metrics",
    "register_metric": "metrics",
    "known_metrics": "metrics",
    "Parser": "parsers",
    "register_parser": "parsers",
    "known_parsers": "parsers",
    "Target": "targets",
    "parse_target": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftkit.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftkit.evaluation.{_EXPORTS[name]}"), name)
