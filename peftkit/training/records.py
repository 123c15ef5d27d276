"""What a run leaves behind and shows while it runs: metrics JSONL (and TensorBoard), a live
progress bar, and a loss-curve PNG.

``metrics.jsonl`` holds one JSON object per line: a training record every ``log_every`` steps
(``{"step", "epoch", "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", ...}``),
an evaluation record after each evaluation (``{"step", "eval/loss", ...}``). A resumed run first
drops the records written after its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from peftkit.progress import progress_display

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


class MetricsLog:
    """Append-only JSONL metrics (rank 0 only), optionally mirrored to TensorBoard."""

    def __init__(self, output_dir: Path | None, tensorboard: bool = False) -> None:
        self.path = output_dir / METRICS_FILE if output_dir else None
        self.writer = None
        if tensorboard and output_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run continues from there)."""
        if self.path is None or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def start_fresh(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # e.g. resumed from another run's checkpoint
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, default=_jsonable) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class TrainingProgress:
    """Step, loss, learning rate, tokens/s, elapsed and remaining time: a live bar on a terminal, a
    plain line every ``PEFTKIT_PROGRESS_INTERVAL`` seconds (default 30) when output goes to a log."""

    def __init__(self, total: int | None, description: str, enabled: bool, console: Console | None = None) -> None:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.progress = progress_display(enabled, console, columns=columns, unit="steps", describe=_describe_step)
        self.task = self.progress.add_task(description, total=total, loss=math.nan, lr=0.0, tps=0.0)

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, completed: int, loss: float, lr: float, tokens_per_second: float) -> None:
        self.progress.update(self.task, completed=completed, loss=loss, lr=lr, tps=tokens_per_second)


def _describe_step(fields: dict[str, Any]) -> str:
    if math.isnan(fields.get("loss", math.nan)):
        return ""
    return f"loss {fields['loss']:.4f}, lr {fields['lr']:.2e}, {fields['tps']:.0f} tok/s"


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str = "training loss") -> Path | None:
    """Training loss per step (raw and smoothed) and evaluation loss, as a PNG."""
    train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    evals = [(m["step"], m["eval/loss"]) for m in metrics if "eval/loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*train, strict=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train (per step)")
    window = max(1, len(losses) // 20)
    if window > 1:
        spans = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
        smoothed = [sum(span) / len(span) for span in spans]
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"train ({window}-step mean)")
    if evals:
        e_steps, e_losses = zip(*evals, strict=True)
        axis.plot(e_steps, e_losses, "o-", color="tab:orange", linewidth=2, label="eval")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss (mean per label token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
