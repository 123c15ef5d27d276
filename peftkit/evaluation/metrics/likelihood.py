"""Likelihood of the reference answers: mean token log-likelihood and perplexity.

Both come from two sums over every example: ``L = Σ log p(reference tokens | prompt)`` and
``T = Σ reference tokens``. ``mean_log_likelihood = L / T`` (nats per token) and
``perplexity = exp(-L / T)``: a token-weighted mean, not a mean of per-example or per-batch
values. In choices mode the reference is the gold choice's continuation, scored by the same pass
that ranks the choices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

from peftkit.evaluation.metrics.base import Metric, MetricContext, MetricResult, register_metric
from peftkit.evaluation.records import Prediction


class _TokenLikelihood(Metric):
    needs: ClassVar[frozenset[str]] = frozenset({"reference", "likelihood"})

    def __init__(self, context: MetricContext) -> None:
        super().__init__(context)
        self.logprob = 0.0
        self.tokens = 0

    def update(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            self.check(p)
            self.logprob += float(p.reference_logprob or 0.0)
            self.tokens += int(p.reference_tokens or 0)

    def mean(self) -> float | None:
        return self.logprob / self.tokens if self.tokens else None

    def details(self) -> dict[str, float]:
        return {"sum_logprob": self.logprob, "tokens": self.tokens}


@register_metric("mean_log_likelihood")
class MeanLogLikelihood(_TokenLikelihood):
    """``Σ log p(token) / Σ tokens`` over the reference tokens (nats; higher is better)."""

    def compute(self) -> MetricResult:
        notes = [] if self.tokens else ["no reference tokens: mean_log_likelihood is undefined"]
        return MetricResult({self.name: self.mean()}, self.details(), notes)


@register_metric("perplexity")
class Perplexity(_TokenLikelihood):
    """``exp(-Σ log p(token) / Σ tokens)`` over the reference tokens (lower is better)."""

    def compute(self) -> MetricResult:
        mean = self.mean()
        notes = [] if self.tokens else ["no reference tokens: perplexity is undefined"]
        return MetricResult({self.name: math.exp(-mean) if mean is not None else None}, self.details(), notes)
