"""``peftkit eval``: an eval config → one base model, its adapters, one comparison report.

::

    model:      {name: smollm2-135m-instruct}
    data:       {eval: {builtin: rotten_tomatoes, options: {split: test}, limit: 200}, formatter: rotten_tomatoes}
    prediction: {choices: [" positive", " negative"]}
    variants:   {zero-shot: base, soft prompt: runs/prompt_tuning/adapter}
    metrics:    [accuracy, precision, recall, f1, confusion_matrix]
    targets:    ["accuracy >= 0.8"]
    output_dir: runs/eval

The base model is loaded once; every adapter folder is loaded onto it under its own name, and each
variant switches which adapters are active (``base``: none). The YAML and ``key=value`` override
rules are those of :mod:`peftkit.config_files` (shared with ``peftkit train``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from rich.console import Console

from peftkit.config import CONFIG_NAME
from peftkit.config_files import ConfigError, describe_errors
from peftkit.evaluation.config import MetricEntry, PredictionConfig, metric_keys
from peftkit.evaluation.report import EvaluationReport
from peftkit.evaluation.targets import check_targets, parse_target
from peftkit.sections import ImportsUserCode, ModelConfig, Section, SourceConfig

BASE = "base"
"""A variant written ``base`` (or ``null``) is the base model with every adapter disabled."""


class EvalConfigError(ConfigError):
    """An invalid eval config; ``problems`` holds one line per invalid field."""

    kind = "eval"


class EvalDataConfig(Section):
    """The examples: records, and how each becomes a prompt and a reference answer."""

    eval: SourceConfig
    """The records (a file, a built-in dataset or inline records; ``limit`` takes the first N)."""
    formatter: str = "prompt_completion"
    """Formatter name (as in training): the prompt is everything before its completion, the
    reference is the completion."""
    formatter_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options of the formatter."""
    max_length: int | None = Field(1024, ge=2)
    """Longest prompt in tokens; older tokens are dropped first (``null``: no limit)."""
    batch_size: int = Field(16, ge=1)
    """Rows per forward pass (generation: per ``generate`` call)."""

    @model_validator(mode="after")
    def _known_formatter(self) -> EvalDataConfig:
        from peftkit.data.formatters import check_formatter

        check_formatter(self.formatter, self.formatter_options)
        return self


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder: ``path`` itself, or ``path/adapter`` (a training run's output folder)."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise ValueError(f"no {CONFIG_NAME} in {path} (nor in {path / 'adapter'}): not an adapter folder")


class ExpertEvalConfig(Section):
    """Metrics per expert (each group of examples routed to its own expert), and mean ± std over experts."""

    field: str = "expert"
    """The record field naming each example's expert: examples are grouped by it, and every active
    bank holding that id applies it to the group."""
    cluster_field: str | None = None
    """A second field (e.g. ``cluster``): a bank holding that value instead applies it (a cluster bank
    under a persona bank, or the fallback for a persona the persona bank does not hold)."""


class EvalConfig(ImportsUserCode):
    """A whole evaluation (the YAML file of ``peftkit eval``)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model (only ``name`` and ``dtype`` matter here)."""
    data: EvalDataConfig
    """The examples."""
    prediction: PredictionConfig
    """How predictions are made: scoring ``choices``, or ``generate`` and parse."""
    variants: dict[str, str | list[str] | None] = Field(default_factory=lambda: {BASE: None})
    """Name → what runs: ``base`` (or ``null``) for the base model, an adapter folder (or a training
    run folder holding ``adapter/``), or a list of folders active together. All on one base model."""
    metrics: list[MetricEntry] = Field(default_factory=lambda: [MetricEntry(name="accuracy")])
    """Metric names, or mappings with a name and options."""
    targets: list[str | dict[str, Any]] = Field(default_factory=list)
    """Quality targets: ``"f1_macro >= 0.8"`` or ``{metric, op, value, variants}``. A failing target
    makes ``peftkit eval`` exit with status 1."""
    experts: ExpertEvalConfig | None = None
    """Also report every metric per expert and its mean ± std over experts (``per_expert.json``)."""
    output_dir: str = "runs/eval"
    """Where report.json, report.md, predictions.jsonl and the PNG plots go."""
    training_run: str | None = None
    """A training run folder: its metrics.jsonl is plotted as training_curve.png."""
    plots: bool = True
    """Write the PNG plots."""

    @field_validator("model")
    @classmethod
    def _no_training_options(cls, value: ModelConfig) -> ModelConfig:
        if value.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing applies to training only")
        return value

    @field_validator("variants")
    @classmethod
    def _valid_variants(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("at least one variant is needed, e.g. {zero-shot: base}")
        for name, spec in value.items():
            folders = [] if spec in (None, BASE) else [spec] if isinstance(spec, str) else spec
            if isinstance(spec, list) and not spec:
                raise ValueError(f"variants.{name}: an empty list; write base for the base model")
            for folder in folders:
                try:
                    adapter_folder(folder)
                except ValueError as exc:
                    raise ValueError(f"variants.{name}: {exc}") from None
        return value

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[MetricEntry], info: ValidationInfo) -> list[MetricEntry]:
        if "prediction" in info.data:
            metric_keys(info.data["prediction"], value)
        return value

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        targets = []
        for i, spec in enumerate(value):
            try:
                targets.append(parse_target(spec))
            except ValueError as exc:
                raise ValueError(f"targets.{i}: {exc}") from None
        if {"prediction", "metrics", "variants"} <= set(info.data):  # else their own errors are reported
            known = metric_keys(info.data["prediction"], info.data["metrics"])
            check_targets(targets, known, list(info.data["variants"]))
        return value

    @field_validator("training_run")
    @classmethod
    def _a_training_run(cls, value: str | None) -> str | None:
        if value is not None and not (Path(value) / "metrics.jsonl").is_file():
            raise ValueError(f"{value} holds no metrics.jsonl (not a training run folder)")
        return value

    def variant_adapters(self) -> tuple[dict[str, Path], dict[str, list[str] | None]]:
        """Adapter name → folder (each folder loaded once), and variant → the adapter names it activates."""
        names: dict[Path, str] = {}
        variants: dict[str, list[str] | None] = {}
        for variant, spec in self.variants.items():
            if spec in (None, BASE):
                variants[variant] = None
                continue
            active = []
            for folder in [spec] if isinstance(spec, str) else spec:
                path = adapter_folder(folder).resolve()
                if path not in names:
                    slug = re.sub(r"\W+", "_", f"{variant}_{len(names)}").strip("_") or "adapter"
                    names[path] = slug if slug[0].isalpha() else f"a_{slug}"
                active.append(names[path])
            variants[variant] = active
        return {name: path for path, name in names.items()}, variants


def load_eval_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read ``path`` (``None``: build the config from ``overrides`` alone), apply overrides, validate."""
    from peftkit.config_files import apply_overrides, read_config_tree

    try:
        tree = read_config_tree(path) if path is not None else {}
        tree = apply_overrides(tree, overrides)
    except ConfigError as exc:
        raise EvalConfigError(exc.problems) from None
    try:
        return EvalConfig.model_validate(tree)
    except ValidationError as exc:
        raise EvalConfigError(describe_errors(exc, model=EvalConfig)) from None
    except ValueError as exc:
        raise EvalConfigError([str(exc)]) from None


def dump_eval_config(config: EvalConfig) -> str:
    import yaml

    tree = config.model_dump(mode="json")
    tree["metrics"] = [{"name": m.name, **m.options} if m.options else m.name for m in config.metrics]
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)


def build_model(config: EvalConfig) -> tuple[Any, Any, dict[str, list[str] | None]]:
    """The base model with every adapter folder loaded once; returns model, tokenizer, variant → adapters."""
    import torch

    from peftkit.models.loading import load_base
    from peftkit.models.peft_model import PeftModel

    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    base, tokenizer = load_base(config.model.name, dtype=dtype, device=config.model.device)
    folders, variants = config.variant_adapters()
    model = None
    for name, folder in folders.items():
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name, tokenizer=tokenizer)
        else:
            model.load_adapter(folder, name, tokenizer=tokenizer)
    if model is None:  # only the base model: a PeftModel without adapters runs it exactly
        model = PeftModel(base, None)
    return model.eval(), tokenizer, variants


def per_expert_report(config: EvalConfig, task: Any, model: Any, variants: dict[str, Any], console: Console) -> Path:
    """Every variant once per expert group; prints mean ± std and writes ``per_expert.json``."""
    import json

    from peftkit.data.sources import open_source
    from peftkit.evaluation.experts import breakdown_table, evaluate_per_expert, expert_groups

    assert config.experts is not None
    records = list(open_source(config.data.eval))
    groups = expert_groups(records, config.experts.field)
    clusters = {}
    if config.experts.cluster_field is not None:
        clusters = {e: str(records[rows[0]].get(config.experts.cluster_field)) for e, rows in groups.items()}
    breakdowns = {
        name: evaluate_per_expert(task, model, groups, adapters=spec, clusters=clusters)
        for name, spec in variants.items()
    }
    console.print(breakdown_table(breakdowns, f"Per {config.experts.field}: mean ± std over {len(groups)}"))
    path = Path(config.output_dir) / "per_expert.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: b.to_dict() for n, b in breakdowns.items()}, indent=1) + "\n")
    return path


def run_evaluation(config: EvalConfig, *, progress: bool = True, console: Console | None = None) -> EvaluationReport:
    """Evaluate every variant of ``config`` on its examples; write and print the report."""
    from peftkit.data.formatters import get_formatter
    from peftkit.data.sources import open_source
    from peftkit.evaluation.evaluator import Evaluation
    from peftkit.evaluation.records import examples_from_records

    console = console or Console()
    model, tokenizer, variants = build_model(config)
    source = open_source(config.data.eval)
    formatter = get_formatter(config.data.formatter, tokenizer, **config.data.formatter_options)
    examples = examples_from_records(source, formatter, name="data.eval")
    if not examples:
        raise ValueError(f"data.eval: {source.name} has no records")
    task = Evaluation(
        tokenizer, examples, config.prediction.build_predictor(), [m.spec for m in config.metrics],
        schema=config.prediction.schema(), targets=config.targets, batch_size=config.data.batch_size,
        max_length=config.data.max_length, chat_template=config.prediction.chat_template,
    )  # fmt: skip
    info = {"model": config.model.name, "data": source.name, "prediction": config.prediction.describe()}
    console.print(
        f"[bold]model[/] {config.model.name}  [bold]data[/] {source.name}: {len(examples)} examples  "
        f"[bold]prediction[/] {info['prediction']}  [bold]variants[/] {', '.join(variants)}",
        highlight=False,
    )
    report = task.compare(model, variants, progress=progress, console=console, info=info)
    written = report.write(config.output_dir, training_run=config.training_run, plots=config.plots)
    console.print(report.table())
    if config.experts is not None:
        written["per_expert"] = per_expert_report(config, task, model, variants, console)
    targets = report.targets_table()
    if targets is not None:
        console.print(targets)
    console.print(f"report: {written['markdown']}, {written['report']}", highlight=False)
    plots = [p.name for k, p in written.items() if p.suffix == ".png"]
    if plots:
        console.print(f"plots: {', '.join(plots)} in {config.output_dir}", highlight=False)
    return report
