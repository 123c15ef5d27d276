"""Evaluation results and their reports: JSON for machines, Markdown and a console table for people.

``EvaluationReport.write(folder)`` leaves::

    report.json         every value, detail (confusion matrices, supports), note and target result
    report.md           the comparison table, targets (PASS/FAIL), per-class table, confusion matrices
    predictions.jsonl   one line per example and variant: prompt, reference, output, parsed answer
    metrics.png         headline metrics, one bar per variant           (see plots.py)
    per_class.png       per-class F1 (or recall/precision) by variant   (classification)
    confusion_matrix.png  one matrix per variant                        (classification)
    training_curve.png  loss and evaluation metrics over steps          (when a training run is given)
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from peftkit.evaluation.metrics import MetricResult
from peftkit.evaluation.records import Prediction
from peftkit.evaluation.targets import TargetResult

PER_CLASS_KINDS = ("precision", "recall", "f1")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@dataclass
class VariantResult:
    """One variant's predictions and metric results.

    Attributes:
        name: the variant's name in the comparison.
        adapters: the adapters that were active (``None``: the base model).
        predictions: one per example, in example order.
        metrics: metric name → result.
        seconds: prediction time (tokenisation excluded).
    """

    name: str
    adapters: tuple[str, ...] | None
    predictions: list[Prediction]
    metrics: dict[str, MetricResult]
    seconds: float

    @property
    def values(self) -> dict[str, float | None]:
        """Every scalar value of every metric, e.g. ``{"accuracy": 0.85, "f1_macro": 0.84, ...}``."""
        return {k: v for result in self.metrics.values() for k, v in result.values.items()}

    @property
    def examples(self) -> int:
        return len(self.predictions)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

    @property
    def unparsed(self) -> int:
        return sum(not p.parsed for p in self.predictions)

    @property
    def notes(self) -> list[str]:
        return [note for result in self.metrics.values() for note in result.notes]

    def confusion_matrix(self) -> dict[str, Any] | None:
        result = self.metrics.get("confusion_matrix")
        return result.details["confusion_matrix"] if result else None

    def summary_line(self) -> str:
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in self.values.items() if "/" not in k and not k.endswith("_micro"))
        speed = f"{self.examples} examples, {self.seconds:.1f} s, {self.examples_per_second:.1f} examples/s"
        return f"{self.name}: {shown or 'no scalar metric'} ({speed})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": list(self.adapters) if self.adapters is not None else None,
            "examples": self.examples,
            "unparsed": self.unparsed,
            "seconds": round(self.seconds, 3),
            "examples_per_second": round(self.examples_per_second, 3),
            "values": self.values,
            "details": {name: r.details for name, r in self.metrics.items() if r.details},
            "notes": self.notes,
        }


@dataclass
class EvaluationReport:
    """Every variant on the same examples, the targets checked, ready to render or write."""

    variants: dict[str, VariantResult]
    targets: list[TargetResult]
    labels: tuple[str, ...] | None
    metrics: list[str]
    prompts: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        """Every target holds (true when there are no targets)."""
        return all(t.passed for t in self.targets)

    @property
    def examples(self) -> int:
        return len(self.prompts)

    def headline_keys(self) -> list[str]:
        """Scalar values shown in the comparison table: all but the per-class values (``f1/positive``)
        and the micro averages, which the per-class table shows beside the macro ones."""
        keys: list[str] = []
        for result in self.variants.values():
            keys += [k for k in result.values if "/" not in k and not k.endswith("_micro") and k not in keys]
        return keys

    def per_class_kinds(self) -> list[str]:
        return [k for k in PER_CLASS_KINDS if k in self.metrics]

    def value(self, variant: str, key: str) -> float | None:
        return self.variants[variant].values.get(key)

    def support(self, variant: str) -> dict[str, int]:
        for kind in self.per_class_kinds():
            return self.variants[variant].metrics[kind].details.get("support", {})
        return {}

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        from peftkit import __version__

        return {
            "peftkit": __version__,
            "created": self.created,
            **self.info,
            "examples": self.examples,
            "labels": list(self.labels) if self.labels is not None else None,
            "metrics": self.metrics,
            "variants": {name: r.to_dict() for name, r in self.variants.items()},
            "targets": [t.to_dict() for t in self.targets],
            "passed": self.passed,
        }

    # ------------------------------------------------------------------ Markdown
    def markdown(self, images: dict[str, str] | None = None) -> str:
        keys = self.headline_keys()
        show_unparsed = any(r.unparsed for r in self.variants.values())
        lines = ["# Evaluation report", ""]
        described = [f"{k} `{v}`" for k, v in self.info.items() if isinstance(v, str | int | float)]
        lines += [" · ".join([*described, f"{self.examples} examples"]), ""]
        header = ["variant", *keys, *(["unparsed"] if show_unparsed else []), "examples/s"]
        lines += [_row(header), _row(["---"] * len(header))]
        for name, r in self.variants.items():
            cells = [name, *(fmt(r.values.get(k)) for k in keys)]
            cells += [str(r.unparsed)] if show_unparsed else []
            lines.append(_row([*cells, f"{r.examples_per_second:.1f}"]))
        if self.targets:
            failed = sum(not t.passed for t in self.targets)
            lines += ["", "## Targets", "", _row(["target", "variant", "value", "result"]), _row(["---"] * 4)]
            for t in self.targets:
                lines.append(_row([f"`{t.target.text}`", t.variant, fmt(t.value), "PASS" if t.passed else "**FAIL**"]))
            verdict = f"All {len(self.targets)} target checks pass." if not failed else (
                f"**{failed} of {len(self.targets)} target checks fail.**"
            )  # fmt: skip
            lines += ["", verdict]
        kinds = self.per_class_kinds()
        if kinds and self.labels:
            lines += [
                "",
                "## Per class",
                "",
                _row(["variant", "class", *kinds, "support"]),
                _row(["---"] * (3 + len(kinds))),
            ]
            for name in self.variants:
                support = self.support(name)
                for label in self.labels:
                    values = [fmt(self.value(name, f"{k}/{label}")) for k in kinds]
                    lines.append(_row([name, label, *values, str(support.get(label, ""))]))
                for average in ("macro", "micro"):
                    values = [fmt(self.value(name, f"{k}_{average}")) for k in kinds]
                    lines.append(_row([name, f"*{average} average*", *values, str(sum(support.values()))]))
        matrices = {name: r.confusion_matrix() for name, r in self.variants.items()}
        if any(matrices.values()):
            lines += ["", "## Confusion matrices", "", "Rows: gold label; columns: predicted label."]
            for name, matrix in matrices.items():
                if matrix:
                    lines += ["", f"**{name}**", "", *_matrix_lines(matrix)]
        notes = [f"{name}: {note}" for name, r in self.variants.items() for note in r.notes]
        if notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
        if images:
            lines += ["", "## Plots", "", *(f"![{title}]({path})" for title, path in images.items())]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ console
    def table(self, title: str = "Evaluation") -> Table:
        """The comparison as a rich table (targets below it: :meth:`targets_table`)."""
        keys = self.headline_keys()
        table = Table(title=f"{title} ({self.examples} examples)")
        table.add_column("variant")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_column("examples/s", justify="right")
        for name, r in self.variants.items():
            table.add_row(name, *(fmt(r.values.get(k)) for k in keys), f"{r.examples_per_second:.1f}")
        return table

    def targets_table(self) -> Table | None:
        if not self.targets:
            return None
        table = Table(title="Quality targets")
        for column in ("target", "variant", "value", "result"):
            table.add_column(column, justify="right" if column == "value" else "left")
        for t in self.targets:
            verdict = "[green]PASS[/]" if t.passed else "[bold red]FAIL[/]"
            table.add_row(t.target.text, t.variant, fmt(t.value), verdict)
        return table

    # ------------------------------------------------------------------ files
    def write(
        self, folder: str | Path, *, training_run: str | Path | None = None, plots: bool = True
    ) -> dict[str, Path]:
        """Write the JSON and Markdown reports, the predictions and (``plots``) the PNGs; returns the paths."""
        from peftkit.evaluation import plots as charts

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        if plots:
            written.update(charts.plot_report(self, folder))
            if training_run is not None:
                curve = charts.plot_training_curve(Path(training_run), folder / charts.CURVE_FILE)
                if curve is not None:
                    written["training curve"] = curve
        images = {title: path.name for title, path in written.items()}
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        (folder / "report.md").write_text(self.markdown(images))
        with open(folder / "predictions.jsonl", "w") as handle:
            for name, result in self.variants.items():
                for p in result.predictions:
                    record = {"variant": name, "prompt": self.prompts[p.index], **p.to_dict()}
                    handle.write(json.dumps(record, default=_jsonable) + "\n")
        return {"report": folder / "report.json", "markdown": folder / "report.md",
                "predictions": folder / "predictions.jsonl", **written}  # fmt: skip


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _matrix_lines(matrix: dict[str, Any]) -> list[str]:
    columns = matrix["columns"]
    unparsed_used = any(row[-1] for row in matrix["matrix"])
    shown = columns if unparsed_used else columns[:-1]
    lines = [_row(["gold \\ predicted", *shown]), _row(["---"] * (len(shown) + 1))]
    for label, row in zip(matrix["labels"], matrix["matrix"], strict=True):
        lines.append(_row([label, *(str(c) for c in row[: len(shown)])]))
    return lines


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
