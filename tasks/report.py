"""What a pipeline run leaves in the Prefect UI and on the terminal: the test-metrics table
artifact, the markdown summary (per stage ran/cached, duration, throughput; dataset counts;
final top-1/top-5; output paths; the training curve as an embedded PNG), and the plain-text
per-stage table that `imagenet pipeline` and `make demo` print.

The curve is drawn here with OpenCV (already a dependency) from the per-test-interval rows, so
the summary never depends on a plotting library.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.stage import StageRun

ARTIFACT_KEY_METRICS = "imagenet-test-metrics"
ARTIFACT_KEY_SUMMARY = "imagenet-summary"
CURVE_SIZE = (640, 360)  # width, height in pixels
CURVE_MARGIN = 48
CURVE_COLOURS = [(200, 80, 30), (30, 140, 30), (30, 30, 200), (150, 30, 150)]  # BGR


def render_curve(rows: Sequence[dict[str, Any]], path: Path | str) -> Path | None:
    """A PNG of every test output against iteration (each scaled to its own 0..max), or None
    when there is nothing to draw."""
    import cv2

    rows = sorted(rows, key=lambda r: r["iter"])
    names = sorted({k for r in rows for k in r if k != "iter"})
    if len(rows) < 1 or not names:
        return None
    w, h, m = CURVE_SIZE[0], CURVE_SIZE[1], CURVE_MARGIN
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.rectangle(img, (m, m // 2), (w - m // 2, h - m), (0, 0, 0), 1)
    iters = [r["iter"] for r in rows]
    span = max(max(iters) - min(iters), 1)

    def x_of(it: int) -> int:
        return int(m + (w - 1.5 * m) * (it - min(iters)) / span)

    for i, name in enumerate(names):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        pts = [(r["iter"], r[name]) for r in rows if name in r]
        top = max(max(v for _, v in pts), 1e-9)
        xy = [(x_of(it), int(h - m - (h - 1.5 * m) * v / top)) for it, v in pts]
        for a, b in zip(xy, xy[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in xy:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, f"{name} (max {top:.3g})", (m + 8, m // 2 + 18 * (i + 1)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    cv2.putText(img, f"iteration {min(iters)} .. {max(iters)}", (m, h - m // 3),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        return None
    path.write_bytes(buf.tobytes())
    return path


def png_data_url(path: Path | str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def stage_table_rows(runs: Sequence[StageRun]) -> list[dict[str, str]]:
    out = []
    for run in runs:
        r = run.result
        out.append({
            "stage": run.name,
            "status": run.status,
            "why": run.why or "-",
            "this run (s)": f"{run.wall_seconds:.1f}",
            "work (s)": f"{r.seconds:.1f}",
            "throughput": r.throughput or "-",
        })
    return out


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    rule = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, rule, *body])


def _md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def summary_markdown(
    runs: Sequence[StageRun],
    *,
    data_root: str,
    datasets: dict[str, dict[str, Any]],
    final: dict[str, Any] | None,
    outputs: dict[str, str],
    curve: Path | None,
) -> str:
    """The end-of-run summary artifact."""
    parts = ["# imagenet pipeline summary\n", f"Data root: `{data_root}`\n", "## Stages\n",
             _md_table(stage_table_rows(runs))]
    if datasets:
        parts += ["\n## Datasets\n", _md_table([{"set": k, **v} for k, v in datasets.items()])]
    if final:
        t1, t5 = final.get("top1"), final.get("top5")
        parts += ["\n## Final accuracy (val LMDB)\n",
                  f"- top-1: **{t1:.4f}**\n" if t1 is not None else "- top-1: n/a\n",
                  f"- top-5: **{t5:.4f}**\n" if t5 is not None else "- top-5: n/a\n"]
    if outputs:
        parts += ["\n## Outputs\n", *[f"- {k}: `{v}`\n" for k, v in outputs.items()]]
    if curve is not None:
        parts += ["\n## Test outputs per test interval\n", f"![training curve]({png_data_url(curve)})\n"]
    return "".join(parts)
