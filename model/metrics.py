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

import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from data.atomic import write_bytes_atomic

LogFn = Callable[[str], None]
# Points of the loss/accuracy plot and its size in pixels.
PLOT_SIZE = (900, 500)


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
        if not self.enabled:
            return
        from PIL import Image, ImageDraw
        train = [(r["iter"], r["loss"]) for r in self.records if r["kind"] == "train"]
        test_loss = [(r["iter"], r["outputs"]["loss"]) for r in self.records
                     if r["kind"] == "test" and r.get("net", 0) == 0 and "loss" in r["outputs"]]
        test_acc = [(r["iter"], r["outputs"]["accuracy"]) for r in self.records
                    if r["kind"] == "test" and r.get("net", 0) == 0
                    and "accuracy" in r["outputs"]]
        w, h = PLOT_SIZE
        left, right, top, bottom = 60, 60, 30, 40
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        d.rectangle([left, top, w - right, h - bottom], outline="black")
        xs = [p[0] for p in train + test_loss + test_acc] or [0, 1]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        losses = [p[1] for p in train + test_loss if math.isfinite(p[1])] or [0, 1]
        l1 = max(max(losses), 1e-6)

        def px(it: float) -> float:
            return left + (it - x0) / (x1 - x0) * (w - left - right)

        def py(v: float, vmax: float) -> float:
            return h - bottom - (v / vmax) * (h - top - bottom)

        for series, color, vmax in ((train, (31, 119, 180), l1), (test_loss, (214, 39, 40), l1),
                                    (test_acc, (44, 160, 44), 1.0)):
            pts = [(px(i), py(v, vmax)) for i, v in series if math.isfinite(v)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for x, y in pts[-1:] if len(pts) > 1 else pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        d.text((left, 8), "train loss", fill=(31, 119, 180))
        d.text((left + 90, 8), "test loss", fill=(214, 39, 40))
        d.text((left + 170, 8), "test accuracy (right axis, 0..1)", fill=(44, 160, 44))
        d.text((left - 50, top), fmt(l1), fill="black")
        d.text((left - 10, h - bottom), "0", fill="black")
        d.text((w - right + 5, top), "1", fill="black")
        d.text((left, h - bottom + 5), str(int(x0)), fill="black")
        d.text((w - right - 40, h - bottom + 5), str(int(x1)), fill="black")
        d.text((w // 2 - 30, h - bottom + 20), "iteration", fill="black")
        png = io.BytesIO()
        img.save(png, format="PNG")
        write_bytes_atomic(self.plot_path, png.getvalue(), durable=False)

