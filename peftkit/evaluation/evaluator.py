"""One evaluation task, run on a model or on several variants of it (base model, adapters).

:class:`Evaluation` prepares everything that does not depend on the model — prompts tokenised,
expected answers read from the references, metrics and targets checked — so a bad metric name, a
target on an unknown metric or a reference outside the label set fails before any forward pass.
It can then run many times: on every variant of a comparison, or at every evaluation of a
training run.

A *variant* is what is active while it runs, on **one** loaded model::

    None                     the base model: every adapter disabled (zero-shot)
    "tuned"                  one adapter
    ["lora", "persona"]      several adapters together (e.g. a soft prompt on top of a LoRA)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from peftkit.evaluation.metrics import MetricContext, MetricResult, build_metric
from peftkit.evaluation.predictors import Predictor, encode_prompts
from peftkit.evaluation.records import EvalExample, Prediction
from peftkit.evaluation.report import EvaluationReport, VariantResult
from peftkit.evaluation.targets import Target, check_targets, evaluate_targets, parse_target

VariantSpec = str | Sequence[str] | None
MetricSpec = str | tuple[str, Mapping[str, Any]]


class _Active:
    """Marker: run with the adapters the model has active (what training evaluates)."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()


@contextlib.contextmanager
def variant_scope(model: Any, adapters: VariantSpec | _Active) -> Iterator[None]:
    """Activate a variant for the duration of the block (eval mode, no gradients); restore afterwards."""
    was_training = model.training
    model.eval()
    previous = list(getattr(model, "active_adapters", []))
    try:
        if isinstance(adapters, _Active):
            yield
        elif adapters is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter([adapters] if isinstance(adapters, str) else list(adapters))
            yield
    finally:
        if previous and not isinstance(adapters, _Active | None):
            model.set_adapter(previous)
        model.train(was_training)


def metric_spec(spec: MetricSpec) -> tuple[str, dict[str, Any]]:
    return (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))


@dataclass
class Evaluation:
    """A prepared task: examples, a predictor, metrics and targets.

    Args:
        tokenizer: the model's tokenizer.
        examples: prompts and references.
        predictor: how predictions are made (:class:`~peftkit.evaluation.predictors.ChoicePredictor`
            or :class:`~peftkit.evaluation.predictors.GenerationPredictor`).
        metrics: metric names, or ``(name, options)`` pairs.
        schema: the JSON Schema for ``schema_compliance``.
        targets: ``"metric op value"`` strings, mappings or :class:`~peftkit.evaluation.targets.Target`.
        batch_size: rows per forward pass.
        max_length: longest prompt in tokens (older tokens are dropped first).
        chat_template: wrap each prompt in the tokenizer's chat template as a user turn.
    """

    tokenizer: Any
    examples: Sequence[EvalExample]
    predictor: Predictor
    metrics: Sequence[MetricSpec] = ("accuracy",)
    schema: Any = None
    targets: Sequence[str | Mapping[str, Any] | Target] = ()
    batch_size: int = 16
    max_length: int | None = None
    chat_template: bool = False
    parsed_targets: list[Target] = field(init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.specs = [metric_spec(m) for m in self.metrics]
        names = [name for name, _ in self.specs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"metric(s) {duplicated} listed twice")
        self.context = MetricContext(labels=self.predictor.labels, schema=self.schema)
        built = self.new_metrics()
        self.value_names = [key for metric in built.values() for key in metric.value_names()]
        self.needs_likelihood = any("likelihood" in m.needs for m in built.values())
        self.parsed_targets = [parse_target(t) for t in self.targets]
        check_targets(self.parsed_targets, self.value_names)
        self.references = [e.reference for e in self.examples]
        for index, reference in enumerate(self.references):
            if reference is not None:
                try:
                    self.predictor.expected(reference)
                except ValueError as exc:
                    raise ValueError(f"example {index}: {exc}") from None
        self.prompts = encode_prompts(
            self.tokenizer, self.examples, max_length=self.max_length, chat_template=self.chat_template
        )

    def new_metrics(self) -> dict[str, Any]:
        return {name: build_metric(name, self.context, options) for name, options in self.specs}

    def predict(self, model: Any, *, progress: bool = True, description: str = "evaluating") -> list[Prediction]:
        """Predictions of ``model`` as it is (its active adapters)."""
        return self.predictor.predict(
            model, self.tokenizer, self.prompts, self.references, likelihood=self.needs_likelihood,
            batch_size=self.batch_size, progress=progress, description=description,
        )  # fmt: skip

    def score(self, predictions: Sequence[Prediction]) -> dict[str, MetricResult]:
        """Every metric over ``predictions`` (counts accumulated over all of them, then computed once)."""
        results = {}
        for name, metric in self.new_metrics().items():
            metric.update(predictions)
            results[name] = metric.compute()
        return results

    def run(
        self, model: Any, *, name: str = "model", adapters: VariantSpec | _Active = ACTIVE, progress: bool = True
    ) -> VariantResult:
        """Predict and score one variant of ``model``."""
        with variant_scope(model, adapters):
            start = time.perf_counter()
            predictions = self.predict(model, progress=progress, description=f"{name}: {self.predictor.mode}")
            seconds = time.perf_counter() - start
        if adapters is None:
            used = None
        elif isinstance(adapters, _Active):
            used = tuple(getattr(model, "active_adapters", ()))
        else:
            used = (adapters,) if isinstance(adapters, str) else tuple(adapters)
        return VariantResult(name, used, predictions, self.score(predictions), seconds)

    def evaluator(self, *, per_class: bool = False) -> Callable[[Any], dict[str, float]]:
        """An ``evaluate(model) -> {name: value}`` function for the trainer: this task on the model's
        active adapters; undefined values left out, per-class values (``f1/positive``) only with
        ``per_class``."""

        def evaluate(model: Any) -> dict[str, float]:
            values = self.run(model, name="eval", progress=False).values
            return {k: v for k, v in values.items() if v is not None and (per_class or "/" not in k)}

        return evaluate

    def compare(
        self,
        model: Any,
        variants: Mapping[str, VariantSpec],
        *,
        progress: bool = True,
        console: Console | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> EvaluationReport:
        """Run every variant on the same examples and check the targets; one report."""
        if not variants:
            raise ValueError("nothing to compare: give at least one variant (None = the base model)")
        check_targets(self.parsed_targets, self.value_names, list(variants))
        known = set(getattr(model, "adapters", {}))
        for variant, spec in variants.items():
            names = [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
            missing = sorted(set(names) - known)
            if missing:
                raise ValueError(f"variant {variant!r}: the model has no adapter(s) {missing}; it has {sorted(known)}")
        results = {}
        for variant, spec in variants.items():
            result = self.run(model, name=variant, adapters=spec, progress=progress)
            results[variant] = result
            if console is not None:
                console.print(result.summary_line(), highlight=False)
        values = {name: r.values for name, r in results.items()}
        base = [name for name, spec in variants.items() if spec is None]
        return EvaluationReport(
            variants=results,
            targets=evaluate_targets(self.parsed_targets, values, base),
            labels=self.predictor.labels,
            metrics=[name for name, _ in self.specs],
            prompts=[e.prompt_text for e in self.examples],
            info=dict(info or {}),
        )


def compare_choices(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    choices: Sequence[str] | Mapping[str, str],
    variants: Mapping[str, VariantSpec],
    *,
    metrics: Sequence[MetricSpec] = ("accuracy", "precision", "recall", "f1", "confusion_matrix"),
    targets: Sequence[str | Mapping[str, Any] | Target] = (),
    batch_size: int = 16,
    progress: bool = True,
    console: Console | None = None,
    info: Mapping[str, Any] | None = None,
) -> EvaluationReport:
    """Classify ``prompts`` by scoring ``choices`` with each variant of ``model``; one report.

    ``references`` are the gold labels (or their continuations). Example::

        report = compare_choices(
            peft_model, tokenizer, prompts, labels, [" positive", " negative"],
            {"zero-shot": None, "soft prompt": "default"},
        )
        console.print(report.table())
        report.write("runs/demo/eval")      # report.json, report.md, predictions.jsonl, PNG plots
    """
    from peftkit.evaluation.predictors import ChoicePredictor

    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    examples = [EvalExample.from_text(p, r) for p, r in zip(prompts, references, strict=True)]
    task = Evaluation(tokenizer, examples, ChoicePredictor(choices), metrics, targets=targets, batch_size=batch_size)
    return task.compare(model, variants, progress=progress, console=console, info=info)
