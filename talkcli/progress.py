"""Terminal output: progress bars with rate and ETA, and messages, all on stderr.

stdout is kept for machine-readable output (``--json``). When stderr is not a terminal, rich
prints each bar once, in its final state, instead of redrawing it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed and task.completed:  # one-step tasks have no sampled speed
            speed = task.completed / task.elapsed
        return Text(f"{speed:6.1f} {self.unit}/s" if speed else f"   ... {self.unit}/s", style="cyan")


class Bar:
    """A handle with ``advance(n)``; a no-op when quiet."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def bar(description: str, total: float | None, unit: str = "frames") -> Iterator[Bar]:
    if _quiet:
        yield Bar(None, None)
        return
    progress = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield Bar(progress, task)


def info(msg: str) -> None:
    if not _quiet:
        console.print(msg, soft_wrap=True)


def warn(msg: str) -> None:
    if not _quiet:  # --quiet: batch scripts read warnings from the --json summary instead
        console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)
