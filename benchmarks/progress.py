"""Cost of terminal progress: data/progress.py (rich) against the hand-written bar it replaced,
drawing to a real terminal (a pty), in the same process, rounds interleaved.

Usage: python benchmarks/progress.py [--updates 2000000] [--redraws 2000] [--rounds 3]

Per round and bar: `--updates` calls of update() (one per image, as convert_imageset makes them,
throttled to a redraw every 0.2 s) timed against a bare counter loop, so the figure is the bar's
own ns per update; then `--redraws` forced redraws (ms each: what one throttled redraw costs).
The baseline is the hand-written bar as committed in BASELINE_COMMIT, read with `git show` (the
script needs the git checkout). The last line projects the overhead onto a full ILSVRC12
conversion (1,331,167 updates) against the ~1.1 ms per image convert takes with 2 workers
(docs: ../shared/docs/MACHINE_NOTES.md):
`progress ns/update: rich X, hand-written Y, ratio X/Y; full conversion +S s (P%)`.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from data import progress as rich_progress  # noqa: E402

BASELINE_COMMIT = "6aec8d7"  # data/progress.py before rich
FULL_COUNT = 1_281_167 + 50_000
CONVERT_S_PER_IMAGE = 1.1e-3
TERMINAL_COLUMNS = 120


def baseline_module() -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:data/progress.py"],
                            cwd=common.REPO, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("progress_handwritten")
    exec(compile(source, f"{BASELINE_COMMIT}:data/progress.py", "exec"), module.__dict__)
    return module


class Terminal:
    """A pty whose other end is drained by a thread, as a terminal emulator would."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, TERMINAL_COLUMNS, 0, 0))
        self.stream = os.fdopen(slave, "w")
        self.bytes = 0
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self.bytes += len(chunk)


def per_update_ns(make, updates: int) -> float:
    t0 = time.perf_counter()
    done = 0
    for _ in range(updates):
        done += 1
    bare = time.perf_counter() - t0
    with make() as bar:
        t0 = time.perf_counter()
        for _ in range(updates):
            bar.update()
        spent = time.perf_counter() - t0
    return (spent - bare) / updates * 1e9


def per_redraw_ms(make, redraws: int) -> float:
    with make() as bar:
        emit = bar._emit
        args = () if "now" not in emit.__code__.co_varnames else (time.monotonic(),)
        t0 = time.perf_counter()
        for _ in range(redraws):
            bar.done += 1
            emit(*args)
        return (time.perf_counter() - t0) / redraws * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=2_000_000)
    p.add_argument("--redraws", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from importlib.metadata import version

    print(common.header("benchmarks/progress.py") + f", rich {version('rich')}", flush=True)
    term = Terminal()
    bars = {"rich": rich_progress.Progress, "hand-written": baseline_module().Progress}
    ns: dict[str, list[float]] = {name: [] for name in bars}
    ms: dict[str, list[float]] = {name: [] for name in bars}
    for round_ in range(args.rounds):
        for name, cls in bars.items():
            def make(cls=cls):
                return cls(FULL_COUNT, "convert_imageset", unit="img", stream=term.stream,
                           enabled=True)
            ns[name].append(per_update_ns(make, args.updates))
            ms[name].append(per_redraw_ms(make, args.redraws))
            print(f"round {round_ + 1} {name:>12}: {ns[name][-1]:6.1f} ns/update, "
                  f"{ms[name][-1]:.3f} ms/redraw", flush=True)
    best = {name: min(v) for name, v in ns.items()}
    redraw = {name: statistics.median(v) for name, v in ms.items()}
    added = best["rich"] * 1e-9 * FULL_COUNT + redraw["rich"] * 1e-3 * (
        FULL_COUNT * CONVERT_S_PER_IMAGE / 0.2)
    share = added / (FULL_COUNT * CONVERT_S_PER_IMAGE) * 100
    print(f"# best ns/update, median ms/redraw: {best}, {redraw}; {term.bytes:,} bytes drawn")
    print(f"progress ns/update: rich {best['rich']:.1f}, hand-written {best['hand-written']:.1f}, "
          f"ratio {best['rich'] / best['hand-written']:.2f}; full conversion +{added:.1f} s "
          f"({share:.3f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
