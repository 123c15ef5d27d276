"""Config sections of evaluation, shared by ``peftkit eval`` and the training run's ``evaluation:``.

::

    prediction:                       # how predictions are made
      choices: [" positive", " negative"]      # score candidates (mode: choices), or
      # mode: generate, parser: number         # generate, then parse
    metrics: [accuracy, f1, confusion_matrix, {name: numeric_match, rel_tol: 0.01}]

Everything that can be checked without a model is checked when the config is read: metric names
and options, parser names and options, the JSON Schema, and (``peftkit eval``) targets against
the values the metrics report. This module imports nothing from ``peftkit.training`` so the
training config can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from peftkit.sections import Section

if TYPE_CHECKING:
    from peftkit.evaluation.predictors import Predictor


class PredictionConfig(Section):
    """How predictions are made: score candidate continuations, or generate and parse."""

    mode: Literal["choices", "generate"] | None = None
    """``choices``: score each candidate continuation after the prompt (no generation);
    ``generate``: generate, then read the answer with ``parser``. Default: ``choices`` when
    ``choices`` is given, else ``generate``."""
    choices: list[str] | dict[str, str] | None = None
    """Candidate continuations, e.g. ``[" positive", " negative"]`` (the labels are the stripped
    texts), or ``{label: continuation}``."""
    choice_scoring: Literal["sum", "mean"] = "sum"
    """Rank choices by total log-probability (``sum``) or per token (``mean``)."""
    parser: str = "text"
    """``generate``: how the answer is read: ``text``, ``number``, ``label``, ``json``, or a registered
    parser."""
    parser_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the parser, e.g. ``{labels: [positive, negative]}`` for ``label``."""
    max_new_tokens: int = Field(32, ge=1)
    """``generate``: the longest answer, in tokens."""
    temperature: float = Field(0.0, ge=0, le=2)
    """``generate``: 0 decodes greedily; above 0 samples (at most 2)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """``generate``: nucleus sampling (with ``temperature > 0``)."""
    top_k: int = Field(0, ge=0)
    """``generate``: top-k sampling, 0 = off (with ``temperature > 0``)."""
    seed: int = Field(0, ge=0)
    """``generate``: seeds sampling."""
    stop: list[str] = Field(default_factory=list)
    """``generate``: cut each generated text at the first of these strings."""
    grammar: Literal["json", "json_schema"] | None = None
    """``generate``: constrain decoding to JSON (``json``) or to ``json_schema`` (llguidance)."""
    json_schema: dict[str, Any] | str | None = None
    """A JSON Schema (inline, or the path of a ``.json`` file): what ``schema_compliance`` checks and
    ``grammar: json_schema`` enforces."""
    chat_template: bool = False
    """Wrap each prompt as one user turn of the tokenizer's chat template (instruct models)."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop cannot contain an empty string")
        return value

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: Any) -> Any:
        if value is None:
            return None
        schema = load_schema(value)
        from peftkit.evaluation.metrics.answers import schema_validator

        schema_validator(schema)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PredictionConfig:
        mode = self.mode or ("choices" if self.choices is not None else "generate")
        generation_only = ("parser", "parser_options", "max_new_tokens", "temperature", "top_p", "top_k", "stop",
                           "grammar", "seed")  # fmt: skip
        if mode == "choices":
            if self.choices is None:
                raise ValueError("mode choices needs choices (the candidate continuations)")
            defaults = {f: type(self).model_fields[f].get_default(call_default_factory=True) for f in generation_only}
            given = sorted(f for f in generation_only if getattr(self, f) != defaults[f])
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join(given)} {verb} to mode generate only (mode is choices)")
            from peftkit.evaluation.predictors import ChoicePredictor

            ChoicePredictor(self.choices, scoring=self.choice_scoring)
        else:
            if self.choices is not None:
                raise ValueError("choices apply to mode choices only (mode is generate)")
            from peftkit.evaluation.parsers import build_parser

            build_parser(self.parser, **self.parser_options)
            if self.grammar == "json_schema" and self.json_schema is None:
                raise ValueError("grammar json_schema needs json_schema")
        if self.mode is None:
            object.__setattr__(self, "mode", mode)  # resolved, without re-validating
        return self

    def schema(self) -> Any:
        """The JSON Schema, loaded (``None`` if none was given)."""
        return load_schema(self.json_schema) if self.json_schema is not None else None

    def build_predictor(self) -> Predictor:
        from peftkit.decoding import DecodingSettings
        from peftkit.evaluation.parsers import build_parser
        from peftkit.evaluation.predictors import ChoicePredictor, GenerationPredictor

        if self.mode == "choices":
            assert self.choices is not None
            return ChoicePredictor(self.choices, scoring=self.choice_scoring)
        settings = DecodingSettings(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=tuple(self.stop),
        )  # fmt: skip
        parser = build_parser(self.parser, **self.parser_options)
        return GenerationPredictor(parser, settings, grammar=self.grammar, schema=self.schema())

    def describe(self) -> str:
        if self.mode == "choices":
            assert self.choices is not None
            shown = list(self.choices.values()) if isinstance(self.choices, dict) else self.choices
            return f"choices ({', '.join(repr(c) for c in shown)}, {self.choice_scoring})"
        grammar = f", grammar {self.grammar}" if self.grammar else ""
        return f"generate (max {self.max_new_tokens} tokens, parser {self.parser}{grammar})"


def load_schema(value: dict[str, Any] | str) -> Any:
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"json_schema file {value} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema file {value} is not valid JSON ({exc.msg})") from None


class MetricEntry(BaseModel):
    """A metric by name; further keys are its options (``{name: numeric_match, rel_tol: 0.01}``)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str
    """A registered metric: ``accuracy``, ``precision``, ``recall``, ``f1``, ``confusion_matrix``,
    ``exact_match``, ``numeric_match``, ``json_validity``, ``schema_compliance``,
    ``mean_log_likelihood``, ``perplexity``, or your own (``register_metric``)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def spec(self) -> tuple[str, dict[str, Any]]:
        return self.name, self.options


def metric_keys(prediction: PredictionConfig, metrics: list[MetricEntry]) -> list[str]:
    """Build every metric once (unknown names, options or needs are errors); the values they report."""
    from peftkit.evaluation.metrics import MetricContext, build_metric

    context = MetricContext(labels=prediction.build_predictor().labels, schema=prediction.schema())
    names = [m.name for m in metrics]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"metric(s) {duplicated} listed twice")
    return [key for m in metrics for key in build_metric(m.name, context, m.options).value_names()]


class TaskEvaluationConfig(Section):
    """A training run's ``evaluation`` section: task metrics on ``data.eval`` at ``training.eval_every``.

    The values are logged as ``eval/<value>`` (``eval/accuracy``, ``eval/f1_macro``, ...) beside
    ``eval/loss``; ``early_stopping`` and ``best_checkpoint`` can watch any of them.
    """

    prediction: PredictionConfig
    """How predictions are made (see ``peftkit eval``)."""
    metrics: list[MetricEntry] = Field(default_factory=lambda: [MetricEntry(name="accuracy")])
    """Metric names, or mappings with a name and options."""
    batch_size: int | None = Field(None, ge=1)
    """Rows per batch (default: ``data.eval_batch_size``, else ``training.batch_size``)."""
    per_class: bool = False
    """Also log the per-class values (``eval/f1/positive``, ...); by default only the overall ones."""

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[MetricEntry], info: ValidationInfo) -> list[MetricEntry]:
        if "prediction" in info.data:  # else the prediction section's own error is reported
            metric_keys(info.data["prediction"], value)
        return value

    def value_names(self) -> list[str]:
        """The values each evaluation reports (without the ``eval/`` prefix)."""
        return metric_keys(self.prediction, self.metrics)
