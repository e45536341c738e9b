"""What a training run shows: Caffe's glog-style log lines, net outputs as Caffe prints them,
`<prefix>_metrics.jsonl` and `<prefix>_plot.png`.

- `CaffeLog` writes "I1127 19:39:11.798727 1234 solver.cpp:239] msg" lines, so log parsers
  written for Caffe (tools/extra/parse_log.py) read ours; `fmt` is C++ ostream's float format.
- `output_lines` / `out_msg`: "Train net output #j: name = v (* w = x loss)" (solver.cpp).
- `OutputSums`: net outputs summed over test batches and averaged in float32, as
  Solver::Test and caffe.cpp's test() do.
- `MetricsWriter`: one JSON line per displayed iteration and per test, and the loss/accuracy
  plot; only process 0's is enabled in multi-process runs.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from data.atomic import write_bytes_atomic
from model.plot import TRAIN_LOSS, curve_png

LogFn = Callable[[str], None]


class CaffeLog:
    """Writes glog-style lines ("I1127 19:39:11.798727 1234 solver.cpp:239] msg") to a
    callable or a logging.Logger, so log parsers written for Caffe work on ours."""

    def __init__(self, sink: LogFn | logging.Logger | None) -> None:
        self.sink = sink
        self.pid = os.getpid()

    def __call__(self, msg: str, where: str = "solver.cpp:0") -> None:
        if isinstance(self.sink, logging.Logger):
            self.sink.info(msg)
            return
        now = time.time()
        t = time.localtime(now)
        prefix = (f"I{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:"
                  f"{t.tm_sec:02d}.{int((now % 1) * 1e6):06d} {self.pid} {where}] ")
        line = prefix + msg
        if self.sink is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.sink(line)


def fmt(x: float) -> str:
    """C++ ostream's default float formatting (6 significant digits, %g)."""
    return f"{float(x):.6g}"

def discard(line: str) -> None:
    """The log of processes other than 0 (process 0 alone logs, as Caffe's root solver)."""


def output_lines(outputs: Mapping[str, np.ndarray], loss_weight: Mapping[str, float],
                  scale: float = 1.0) -> list[tuple[str, float, float]]:
    """Net outputs flattened element-wise as Caffe prints them: (name, value, loss weight)."""
    rows = []
    for name, value in outputs.items():
        for v in np.asarray(value, np.float32).ravel():
            rows.append((name, float(np.float32(v) * np.float32(scale)), loss_weight.get(name, 0)))
    return rows


def out_msg(kind: str, j: int, name: str, value: float, weight: float) -> str:
    msg = f"    {kind} net output #{j}: {name} = {fmt(value)}"
    if weight:
        msg += f" (* {fmt(weight)} = {fmt(np.float32(weight) * np.float32(value))} loss)"
    return msg


class OutputSums:
    """Net outputs summed element-wise over batches, and the loss, in float32; `means(n)` gives
    (blob name, key, mean) per element, the key "name[e]" for outputs of several elements
    (Solver::Test's test_score, caffe.cpp test()'s test_score)."""

    def __init__(self) -> None:
        self.scores: dict[str, np.ndarray] = {}
        self.loss = np.float32(0)

    def add(self, loss: Any, outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Adds one batch (host values); returns its outputs flattened to float32."""
        self.loss += np.float32(loss)
        flat: dict[str, np.ndarray] = {}
        for name, v in outputs.items():
            v = np.asarray(v, np.float32).ravel()
            self.scores[name] = v if name not in self.scores else self.scores[name] + v
            flat[name] = v
        return flat

    def means(self, n: int) -> list[tuple[str, str, np.float32]]:
        rows = []
        for name, total in self.scores.items():
            for e, v in enumerate(total):
                rows.append((name, name if total.size == 1 else f"{name}[{e}]",
                             np.float32(v) / np.float32(n)))
        return rows


class MetricsWriter:
    """JSON-lines metrics and a PNG plot (train loss, test loss, test accuracy vs iteration)."""

    def __init__(self, path: Path, plot_path: Path, resume_iter: int | None, *,
                 enabled: bool = True) -> None:
        self.path, self.plot_path = path, plot_path
        self.records: list[dict[str, Any]] = []
        self.enabled = enabled  # False: processes other than 0 keep records in memory only
        if not enabled:
            return
        if resume_iter is not None and path.exists():
            # drop what a killed run logged after the snapshot we resume from
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("iter", 0) < resume_iter:
                    self.records.append(rec)
        # The file is (re)written at the first record: a run that fails before its first
        # iteration (a bad label in the first batch, say) leaves the metrics as they were.
        self._written = False

    def add(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if not self.enabled:
            return
        if not self._written:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n"
                                                  for r in self.records).encode(), durable=False)
            self._written = True
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def plot(self) -> None:
        """`<prefix>_plot.png`: the train loss and the first test net's outputs against the
        iteration, drawn by model/plot.py (the pipeline summary's curve too)."""
        if not self.enabled:
            return
        rows = [{"iter": r["iter"], TRAIN_LOSS: r["loss"]} for r in self.records
                if r["kind"] == "train"]
        rows += [{"iter": r["iter"], **r["outputs"]} for r in self.records
                 if r["kind"] == "test" and r.get("net", 0) == 0]
        png = curve_png(rows)
        if png is not None:
            write_bytes_atomic(self.plot_path, png, durable=False)

