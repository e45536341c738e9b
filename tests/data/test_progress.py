"""data/progress.py: rich's bar on a terminal, nothing on a pipe, the observer hook throttled and
called at the end, warnings on lines of their own."""
from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import termios
import threading

from data.progress import Progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Pty:
    """A terminal of `columns` whose output is collected by a thread."""

    def __init__(self, columns: int) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.stream = os.fdopen(slave, "w")
        self.raw = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self.raw.extend(chunk)

    def close(self) -> str:
        self.stream.close()
        self._thread.join(5)
        os.close(self.master)
        return self.raw.decode()

    @staticmethod
    def screen_lines(raw: str) -> list[str]:
        """What stays on screen: each line's text after its last carriage return."""
        lines = []
        for line in ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
            shown = [part for part in line.split("\r") if part.strip()]
            lines.append(shown[-1].rstrip() if shown else "")
        return [line for line in lines if line]


def test_nothing_is_written_where_stderr_is_not_a_terminal():
    stream = io.StringIO()
    seen: list[tuple[int, int | None]] = []
    with Progress(1000, "convert_imageset", stream=stream, min_interval=0,
                  on_update=lambda done, total: seen.append((done, total))) as bar:
        for _ in range(1000):
            bar.update()
    assert stream.getvalue() == ""
    assert len(seen) == 1001 and seen[-1] == (1000, 1000)  # every update, then the end


def test_observer_is_throttled_but_always_sees_the_end():
    seen: list[tuple[int, int | None]] = []
    with Progress(None, stream=io.StringIO(), min_interval=3600,
                  on_update=lambda done, total: seen.append((done, total))) as bar:
        for _ in range(100):
            bar.update(5)
    assert len(seen) <= 2 and seen[-1] == (500, None)  # at most the first update, and the end


def test_forced_on_a_pipe_draws_the_final_state_once():
    stream = io.StringIO()
    with Progress(3, "mean", unit="rec", stream=stream, enabled=True, min_interval=0) as bar:
        bar.update(3)
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("mean ") and "100.0% 3/3 rec" in text


def test_terminal_bar_is_one_line_and_leaves_a_cursor():
    for columns in (120, 50):
        term = Pty(columns)
        with Progress(1000, "convert_imageset", unit="img", stream=term.stream,
                      min_interval=0) as bar:
            for _ in range(1000):
                bar.update()
        raw = term.close()
        lines = Pty.screen_lines(raw)
        assert len(lines) == 1, lines  # redrawn in place, never wrapped onto a second line
        assert lines[0].startswith("convert_imageset ")
        assert len(lines[0]) <= columns
        if columns == 120:
            assert re.search(r"100\.0% 1,000/1,000 img [\d,.]+ img/s \d+:\d\d:\d\d$", lines[0])
        assert raw.endswith("\x1b[?25h")  # the cursor rich hid is shown again


def test_bytes_shown_as_megabytes_total_learned_late():
    term = Pty(120)
    with Progress(None, "download", unit="B", scale=1 / 2**20, scale_unit="MB",
                  stream=term.stream, min_interval=0) as bar:
        bar.update(3 * 2**20)
        bar.total = 8 * 2**20
        bar.update(5 * 2**20)
    lines = Pty.screen_lines(term.close())
    assert len(lines) == 1 and "100.0% 8/8 MB" in lines[0] and "MB/s" in lines[0]


def test_a_warning_gets_a_line_of_its_own_and_the_bar_goes_on_below():
    term = Pty(120)
    with Progress(10, "convert_imageset", unit="img", stream=term.stream, min_interval=0) as bar:
        for i in range(10):
            bar.update()
            if i == 4:
                bar.clear_line()
                term.stream.write("skipped x.jpg (listing line 5): not an image\n")
                term.stream.flush()
    lines = Pty.screen_lines(term.close())
    assert lines[0] == "skipped x.jpg (listing line 5): not an image"
    assert len(lines) == 2 and "10/10 img" in lines[1]
