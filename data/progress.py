"""Progress of long jobs (conversion, mean, download, extraction): a terminal bar drawn by rich,
and a hook for other observers.

Long jobs report through `Progress`. On a terminal, rich redraws one line on stderr (bar,
percent, count, rate, time left); elsewhere (a pipe, a CI log, a Prefect worker) nothing is
written, so logs never fill with carriage returns (the final summary line is the caller's).
`on_update(done, total)` lets a caller (a Prefect task's progress artifact, say) follow along.
Both are called at most every `min_interval` seconds and once at the end: `update()` itself only
counts, so a per-image call costs what a counter costs (benchmarks/progress.py measures it).
rich draws without its refresh thread (the bar is redrawn by the throttled updates), so no
thread is running when the conversion forks its worker processes.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.table import Column
from rich.progress import (BarColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.progress import Progress as RichProgress
from rich.text import Text

Observer = Callable[[int, "int | None"], None]
BAR_WIDTH = 28


class _Figures(ProgressColumn):
    """`45% 1,234/2,742 img 1,800.0 img/s ETA 0:00:01`; scaled (bytes as MB); while the total is
    unknown `1,234 MB 40.0 MB/s 0:00:31` (time spent). One column: every column rich lays out
    adds to each redraw (6 columns cost ~2.5 ms a redraw here, this one ~1.1 ms)."""

    def __init__(self, scale: float, unit: str) -> None:
        super().__init__()
        self.scale, self.unit = scale, unit
        self._left = TimeRemainingColumn(elapsed_when_finished=True)
        self._spent = TimeElapsedColumn()

    def render(self, task: Task) -> Text:
        # rich's speed is over its recent window; the whole run's average before it has one.
        speed = task.finished_speed or task.speed
        if speed is None:
            elapsed = task.elapsed or 0.0
            speed = task.completed / elapsed if elapsed > 0 else 0.0
        done = f"{task.completed * self.scale:,.0f}"
        rate = f"{speed * self.scale:,.1f} {self.unit}/s"
        if task.total is None:
            text = Text(f"{done} {self.unit} {rate} ") + self._spent.render(task)
        else:
            head = (f"{task.percentage:5.1f}% {done}/{task.total * self.scale:,.0f} {self.unit} "
                    f"{rate} ")
            text = Text(head if task.finished else head + "ETA ") + self._left.render(task)
        # One line whatever the width: a wrapped bar would be redrawn as two.
        text.no_wrap, text.overflow = True, "ellipsis"
        return text


def _columns(stream: TextIO) -> int | None:
    """The width of the terminal `stream` writes to; None for rich to ask the standard streams
    each redraw (which follows a resized window)."""
    if stream in (sys.stdout, sys.stderr):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (OSError, ValueError, AttributeError):
        return None


class Progress:
    """Count `done` out of `total` (None when unknown); use as a context manager."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "it",
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        on_update: Observer | None = None,
        min_interval: float = 0.2,
        scale: float = 1.0,
        scale_unit: str | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.on_update = on_update
        self.min_interval = min_interval
        self.scale = scale  # e.g. 1/2**20 with scale_unit "MB" to show bytes as MB
        self.scale_unit = scale_unit or unit
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._bar: RichProgress | None = None
        self._task = None
        if self.enabled:
            # A console that is not a terminal (enabled=True on a pipe) draws once, at the end.
            self._bar = RichProgress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=BAR_WIDTH), _Figures(scale, self.scale_unit),
                console=Console(file=self.stream, width=_columns(self.stream), highlight=False),
                auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False)
            self._task = self._bar.add_task(desc, total=total)

    def __enter__(self) -> "Progress":
        self.start = time.monotonic()
        if self._bar is not None:
            self._bar.reset(self._task, total=self.total, start=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            self._emit()

    def rate(self) -> float:
        """Items per second so far."""
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def clear_line(self) -> None:
        """Blank the bar's line, so that a message written next starts at column 0 (the bar is
        drawn again below it with the next update)."""
        if self._bar is not None and self._bar.live.is_started:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _emit(self) -> None:
        if self.on_update is not None:
            self.on_update(self.done, self.total)
        if self._bar is None:
            return
        self._bar.update(self._task, total=self.total, completed=self.done)
        if self._bar.live.is_started:
            self._bar.refresh()
        else:
            self._bar.start()
            self._bar.refresh()
            # rich hides the cursor while it draws; a process killed meanwhile (SIGKILL) would
            # leave the user's terminal without one.
            self._bar.console.show_cursor(True)

    def close(self) -> None:
        self._emit()
        if self._bar is not None:
            self._bar.stop()  # draws the last state and ends its line
            self._bar = None
