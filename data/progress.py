"""A small terminal progress bar (items/s, ETA) and a hook for other observers.

Long jobs (conversion, mean, download, extraction) report through `Progress`. On a terminal it
redraws one line on stderr; elsewhere it stays silent (the final summary line is the caller's).
`on_update(done, total)` lets a caller (a Prefect task's progress artifact, say) follow along,
called at most every `min_interval` seconds and once at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Observer = Callable[[int, "int | None"], None]


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


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

    def __enter__(self) -> "Progress":
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            self._emit(now)

    def rate(self) -> float:
        """Items per second so far."""
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _emit(self, now: float, final: bool = False) -> None:
        if self.on_update is not None:
            self.on_update(self.done, self.total)
        if not self.enabled:
            return
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        shown = self.done * self.scale
        if self.total:
            frac = min(self.done / self.total, 1.0)
            width = 28
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            text = (f"{self.desc} [{bar}] {frac:6.1%} {shown:,.0f}/{self.total * self.scale:,.0f} "
                    f"{self.scale_unit} {rate * self.scale:,.1f} {self.scale_unit}/s "
                    f"ETA {_fmt_duration(eta)}")
        else:
            text = (f"{self.desc} {shown:,.0f} {self.scale_unit} "
                    f"{rate * self.scale:,.1f} {self.scale_unit}/s {_fmt_duration(elapsed)}")
        self.stream.write("\r" + text + ("\n" if final else ""))
        self.stream.flush()

    def close(self) -> None:
        self._emit(time.monotonic(), final=True)
