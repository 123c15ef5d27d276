"""PNG plots of an evaluation report and of a training run (matplotlib, Agg backend: no display).

* ``metrics.png`` — headline metrics whose values are fractions (accuracy, F1, compliance, ...),
  one bar per variant;
* ``per_class.png`` — per-class F1 (else recall, else precision), one bar per variant;
* ``confusion_matrix.png`` — one matrix per variant, cells coloured by the row's share;
* ``training_curve.png`` — training and evaluation loss, and the evaluation metrics, over steps,
  from a training run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.evaluation.report import EvaluationReport

METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE, CURVE_FILE = (
    "metrics.png",
    "per_class.png",
    "confusion_matrix.png",
    "training_curve.png",
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: EvaluationReport, folder: Path) -> dict[str, Path]:
    """Every plot the report supports; returns title → path."""
    written = {}
    for title, function, name in (
        ("metrics", plot_metrics, METRICS_FILE),
        ("per class", plot_per_class, PER_CLASS_FILE),
        ("confusion matrices", plot_confusion_matrices, CONFUSION_FILE),
    ):
        path = function(report, folder / name)
        if path is not None:
            written[title] = path
    return written


def grouped_bars(groups: list[str], series: dict[str, list[float | None]], path: Path, title: str, ylabel: str) -> Path:
    """One group of bars per entry of ``groups``, one bar per series (variant), values printed on top."""
    plt = _pyplot()
    width = 0.8 / max(1, len(series))
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 + len(groups) * (0.5 + 0.35 * len(series))), 4), dpi=110)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = axis.bar(xs, heights, width, label=name)
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value is None else f"{value:.2f}"
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          fontsize=7, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    axis.set_xticks(
        range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center"
    )
    axis.set_ylim(0, 1.1)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return _save(figure, path)


def plot_metrics(report: EvaluationReport, path: Path) -> Path | None:
    keys = [
        k
        for k in report.headline_keys()
        if all((v := report.value(name, k)) is None or 0.0 <= v <= 1.0 for name in report.variants)
        and k not in ("perplexity", "mean_log_likelihood")
    ]
    if not keys:
        return None
    series = {name: [report.value(name, k) for k in keys] for name in report.variants}
    return grouped_bars(keys, series, path, f"metrics by variant ({report.examples} examples)", "value")


def plot_per_class(report: EvaluationReport, path: Path) -> Path | None:
    kinds = report.per_class_kinds()
    if not kinds or not report.labels:
        return None
    kind = kinds[-1]  # f1 if present, else recall, else precision
    labels = list(report.labels)
    series = {name: [report.value(name, f"{kind}/{label}") for label in labels] for name in report.variants}
    return grouped_bars(labels, series, path, f"per-class {kind} by variant", kind)


def plot_confusion_matrices(report: EvaluationReport, path: Path) -> Path | None:
    matrices = {name: r.confusion_matrix() for name, r in report.variants.items()}
    matrices = {name: m for name, m in matrices.items() if m}
    if not matrices:
        return None
    plt = _pyplot()
    unparsed = any(row[-1] for m in matrices.values() for row in m["matrix"])
    n = len(matrices)
    size = len(next(iter(matrices.values()))["labels"])
    cell = max(0.5, min(1.0, 6 / (size + 1)))
    figure, axes = plt.subplots(1, n, figsize=(1.5 + n * (1.8 + cell * (size + unparsed)), 1.6 + cell * size), dpi=110,
                                squeeze=False)  # fmt: skip
    for axis, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        counts = [row if unparsed else row[:-1] for row in matrix["matrix"]]
        shares = [[c / max(1, sum(row)) for c in row] for row in counts]
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        columns = matrix["columns"] if unparsed else matrix["columns"][:-1]
        axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(matrix["labels"])), matrix["labels"], fontsize=8)
        for r, row in enumerate(counts):
            for c, count in enumerate(row):
                colour = "white" if shares[r][c] > 0.6 else "black"
                axis.text(c, r, str(count), ha="center", va="center", color=colour, fontsize=9)
        axis.set_xlabel("predicted")
        axis.set_ylabel("gold")
        axis.set_title(name, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_training_curve(run_dir: Path, path: Path) -> Path | None:
    """Loss (train per step, eval at its cadence) and evaluation metrics over steps, from ``metrics.jsonl``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics.jsonl``.
    """
    source = run_dir / "metrics.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder: no metrics.jsonl in it")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    if not train:
        return None
    evals: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("eval/") and key != "eval/label_tokens" and isinstance(value, int | float):
                evals.setdefault(key, []).append((record["step"], value))
    loss_eval = evals.pop("eval/loss", [])
    task = {k: v for k, v in evals.items() if "/" not in k.removeprefix("eval/")}  # headline metrics only
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2 if task else 1, figsize=(11 if task else 7, 4), dpi=110, squeeze=False)
    axis = axes[0][0]
    axis.plot(*zip(*train, strict=True), color="tab:blue", alpha=0.5, linewidth=1, label="train loss")
    if loss_eval:
        axis.plot(*zip(*loss_eval, strict=True), "o-", color="tab:orange", linewidth=2, label="eval loss")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss (mean per label token)")
    axis.set_title(f"training run {run_dir.name}")
    axis.grid(alpha=0.3)
    axis.legend()
    if task:
        axis = axes[0][1]
        for key, points in task.items():
            axis.plot(*zip(*points, strict=True), "o-", linewidth=2, label=key.removeprefix("eval/"))
        axis.set_xlabel("optimiser step")
        axis.set_title("evaluation metrics")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
