"""Progress for long work, on a terminal and off it.

On a terminal, a live rich progress bar. Off a terminal (output piped to a log, CI), a live bar
prints nothing until the end, so a long run would look hung; there :class:`ProgressLog` prints
one plain line at most every ``PEFTKIT_PROGRESS_INTERVAL`` seconds (default 30), and one when a
task completes::

    prompt tuning: 40/200 steps (20%), loss 0.4210, 240 tok/s, elapsed 0:00:51, eta 0:03:24
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress

DEFAULT_INTERVAL = 30.0


def log_interval() -> float:
    """Seconds between progress lines off a terminal (``$PEFTKIT_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("PEFTKIT_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    done_reported: bool = False


class ProgressLog:
    """The subset of ``rich.progress.Progress`` peftkit uses, printing plain lines at intervals.

    Args:
        console: where lines go.
        unit: what is counted (``steps``, ``examples``).
        describe: ``fields -> str``, extra text for a line (loss, throughput, ...).
        interval: seconds between lines (default :func:`log_interval`).
    """

    def __init__(
        self,
        console: Console,
        *,
        unit: str = "",
        describe: Callable[[dict[str, Any]], str] | None = None,
        interval: float | None = None,
    ) -> None:
        self.console, self.unit, self.describe = console, unit, describe
        self.interval = log_interval() if interval is None else interval
        self.tasks: list[_Task] = []

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        for task in self.tasks:
            if not task.done_reported and task.completed and exc[0] is None:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, fields=dict(fields)))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, completed: float | None = None, advance: float = 0, **fields: Any) -> None:
        task = self.tasks[task_id]
        task.completed = completed if completed is not None else task.completed + advance
        task.fields.update(fields)
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if finished and not task.done_reported:
            task.done_reported = True
            self._print(task)
        elif not finished and now - task.last_line >= self.interval:
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _print(self, task: _Task) -> None:
        now = time.monotonic()
        task.last_line = now
        elapsed = now - task.started
        parts = [f"{task.description}: {task.completed:g}"]
        if task.total:
            parts[0] += f"/{task.total:g}"
        if self.unit:
            parts[0] += f" {self.unit}"
        if task.total:
            parts[0] += f" ({100 * task.completed / task.total:.0f}%)"
        if self.describe is not None:
            extra = self.describe(task.fields)
            if extra:
                parts.append(extra)
        parts.append(f"elapsed {_clock(elapsed)}")
        if task.total and task.completed and task.completed < task.total:
            parts.append(f"eta {_clock(elapsed / task.completed * (task.total - task.completed))}")
        self.console.print(", ".join(parts), highlight=False, markup=False)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_display(
    enabled: bool,
    console: Console | None = None,
    *,
    columns: tuple = (),
    transient: bool = False,
    unit: str = "",
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> Progress | ProgressLog:
    """A live bar on a terminal, interval lines off it, or a disabled bar when not ``enabled``."""
    from rich import get_console

    console = console or get_console()
    if enabled and not console.is_terminal:
        return ProgressLog(console, unit=unit, describe=describe)
    return Progress(*columns, disable=not enabled, console=console, transient=transient)
