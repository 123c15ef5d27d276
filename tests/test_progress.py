"""Progress off a terminal: a plain line at intervals instead of silence (a demo piped to a log)."""

import io

from rich.console import Console

from peftkit.progress import ProgressLog, progress_display
from peftkit.training.records import TrainingProgress


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_off_a_terminal_training_prints_lines_at_intervals(monkeypatch):
    monkeypatch.setenv("PEFTKIT_PROGRESS_INTERVAL", "0")
    console, out = log_console()
    with TrainingProgress(4, "prompt tuning", True, console) as progress:
        for step in range(1, 5):
            progress.update(step, loss=1.0 / step, lr=1e-3, tokens_per_second=240.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("prompt tuning: 1/4 steps (25%), loss 1.0000, lr 1.00e-03, 240 tok/s, elapsed 0:00:00")
    assert "eta" in lines[0] and "eta" not in lines[-1] and lines[-1].startswith("prompt tuning: 4/4 steps (100%)")


def test_the_interval_bounds_how_often_a_line_is_printed(monkeypatch):
    monkeypatch.setenv("PEFTKIT_PROGRESS_INTERVAL", "3600")
    console, out = log_console()
    with ProgressLog(console, unit="examples") as progress:
        task = progress.add_task("zero-shot", total=100)
        for _ in range(100):
            progress.advance(task)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the completion line
    assert out.getvalue().startswith("zero-shot: 100/100 examples (100%)")


def test_on_a_terminal_it_is_a_live_bar_and_disabled_means_silent():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(progress_display(True, terminal), ProgressLog)
    console, out = log_console()
    with progress_display(False, console) as progress:
        progress.update(progress.add_task("x", total=2), completed=2)
    assert out.getvalue() == ""
