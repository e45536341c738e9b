"""What a pipeline run leaves in the Prefect UI and on the terminal: the test-metrics table
artifact, the markdown summary (per stage ran/cached and why, duration, throughput; dataset
counts; final top-1/top-5; output paths; the training curve as an embedded PNG), the plain-text
per-stage table that `imagenet pipeline` and `make demo` print, and the flow's last log line.

Numbers are shown at NUMBER_DIGITS significant digits (a float32 accuracy of 0.045 is stored as
0.044999998062849045). The curve is drawn here with OpenCV (already a dependency), so the summary
never depends on a plotting library: two panels over one iteration axis, losses on top (train
and test, on their shared scale) and accuracies below (0 to 1), each with a labelled y axis and
its legend in a column to the right of the plot, where no line can run under it.
"""
from __future__ import annotations

import base64
import math
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.stage import StageRun

# The event that carries the final line: `prefect deployment run --watch` prints a run's events
# (and its logs only where the server streams them out, which Prefect's default settings do
# not), each as "<event> * <resource name>", so the name is the line itself.
RESULT_EVENT = "imagenet.pipeline.finished"
FAILED_EVENT = "imagenet.pipeline.failed"        # the one-line cause, as the state message
CANCELLED_EVENT = "imagenet.pipeline.cancelled"  # where training stopped
RESULT_RESOURCE = "imagenet.pipeline.result.{flow_run_id}"
EVENT_FLUSH_TIMEOUT_S = 10
ARTIFACT_KEY_METRICS = "imagenet-test-metrics"
ARTIFACT_KEY_SUMMARY = "imagenet-summary"
CURVE_FILE = "curve.png"
NUMBER_DIGITS = 4
SHORT_WHY = 100  # characters of a cause in the summary's stage table (the headline has it all)

# Curve layout, in pixels.
CURVE_WIDTH = 900
PANEL_HEIGHT = 220
MARGIN_LEFT = 86     # tick labels and the rotated axis label
MARGIN_TOP = 34      # the panel's title
MARGIN_BOTTOM = 52   # iteration tick labels and the axis label
PANEL_GAP = 40
LEGEND_WIDTH = 250   # the legend column, right of the plots
LEGEND_ROW = 20
TICK = 5
TICKS_WANTED = 5
MARKER_RADIUS = 3
MAX_MARKERS = 40     # a series with more points (the train loss) is drawn as a line only
FONT_SCALE = 0.45
TITLE_SCALE = 0.55
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
# BGR; colour-blind-safe (Okabe-Ito): blue, vermillion, bluish green, orange, purple.
CURVE_COLOURS = [(178, 114, 0), (0, 94, 213), (115, 158, 0), (0, 159, 230), (167, 121, 204)]
LOSS_AXIS = "loss (cross-entropy, nats)"
ACCURACY_AXIS = "accuracy (fraction of images)"
ITERATION_AXIS = "iteration"
TRAIN_LOSS = "train loss"


def sig(value: Any, digits: int = NUMBER_DIGITS) -> str:
    """A number at `digits` significant digits (0.044999998 -> 0.045, 1234567 -> 1.235e+06);
    anything else as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{float(value):.{digits}g}"


def rounded_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every float at NUMBER_DIGITS significant digits (for table artifacts)."""
    return [{k: (float(sig(v)) if isinstance(v, float) else v) for k, v in row.items()}
            for row in rows]


def is_loss(name: str) -> bool:
    return "loss" in name.lower()


def nice_ticks(lo: float, hi: float, wanted: int = TICKS_WANTED) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi: the finest
    such step that needs at most wanted + 1 ticks."""
    if hi <= lo:
        hi = lo + 1.0
    base = 10.0 ** math.floor(math.log10((hi - lo) / wanted))
    for m in (1, 2, 5, 10, 20, 50):
        step = m * base
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first + 1 <= wanted + 1:
            break
    return [round(i * step, 12) for i in range(first, last + 1)]


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = FONT_SCALE,
          colour: tuple[int, int, int] = BLACK, align: str = "left") -> None:
    import cv2

    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = org[0] - (w if align == "right" else w // 2 if align == "center" else 0)
    cv2.putText(img, text, (x, org[1] + h // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1,
                cv2.LINE_AA)


def _vertical_text(img: np.ndarray, text: str, centre: tuple[int, int]) -> None:
    """`text` rotated 90 degrees counter-clockwise, centred at `centre` (a y-axis label)."""
    import cv2

    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, 1)
    strip = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(strip, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, BLACK, 1,
                cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0, x0 = centre[1] - strip.shape[0] // 2, centre[0] - strip.shape[1] // 2
    img[y0:y0 + strip.shape[0], x0:x0 + strip.shape[1]] = np.minimum(
        img[y0:y0 + strip.shape[0], x0:x0 + strip.shape[1]], strip)


def _panel(img: np.ndarray, top: int, title: str, axis: str, series: dict[str, list],
           x_ticks: list[float], y_range: tuple[float, float] | None, colours: dict) -> None:
    """One panel: frame, grid, ticks, axis labels, the series and their legend."""
    import cv2

    left, right = MARGIN_LEFT, CURVE_WIDTH - LEGEND_WIDTH
    bottom = top + PANEL_HEIGHT
    values = [v for pts in series.values() for _, v in pts]
    lo, hi = y_range if y_range else (0.0, max(max(values), 1e-9))
    y_ticks = nice_ticks(lo, hi)
    lo, hi = y_ticks[0], y_ticks[-1]
    x_lo, x_hi = x_ticks[0], x_ticks[-1]

    def px(it: float) -> int:
        return int(round(left + (right - left) * (it - x_lo) / (x_hi - x_lo)))

    def py(v: float) -> int:
        return int(round(bottom - (bottom - top) * (v - lo) / (hi - lo)))

    for t in y_ticks:
        cv2.line(img, (left, py(t)), (right, py(t)), GRID, 1)
        cv2.line(img, (left - TICK, py(t)), (left, py(t)), BLACK, 1)
        _text(img, sig(t, 3), (left - TICK - 3, py(t)), align="right")
    for t in x_ticks:
        cv2.line(img, (px(t), top), (px(t), bottom), GRID, 1)
        cv2.line(img, (px(t), bottom), (px(t), bottom + TICK), BLACK, 1)
        _text(img, f"{int(t)}" if float(t).is_integer() else sig(t, 3),
              (px(t), bottom + TICK + 9), align="center")
    cv2.rectangle(img, (left, top), (right, bottom), BLACK, 1)
    _text(img, title, (left, top - MARGIN_TOP // 2), scale=TITLE_SCALE)
    _vertical_text(img, axis, (MARGIN_LEFT // 4, (top + bottom) // 2))
    _text(img, ITERATION_AXIS, ((left + right) // 2, bottom + MARGIN_BOTTOM - 14), align="center")

    for row, (name, pts) in enumerate(series.items()):
        colour = colours[name]
        xy = [(px(it), py(v)) for it, v in pts]
        for a, b in zip(xy, xy[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        if len(xy) <= MAX_MARKERS:
            for p in xy:
                cv2.circle(img, p, MARKER_RADIUS, colour, -1, cv2.LINE_AA)
        # The legend: a swatch and the name with its last value, outside the plot area.
        ly = top + LEGEND_ROW * (row + 1)
        cv2.line(img, (right + 14, ly), (right + 36, ly), colour, 2, cv2.LINE_AA)
        label = name if name == TRAIN_LOSS else f"test {name}"
        _text(img, f"{label} (last {sig(pts[-1][1])})", (right + 42, ly))


def render_curve(rows: Sequence[dict[str, Any]], path: Path | str) -> Path | None:
    """A PNG of the training curve from per-iteration rows ({"iter": N, name: value, ...}):
    losses in the top panel, accuracies (0..1) in the bottom one; None when there is nothing
    to draw. The legend gives each series' last value."""
    import cv2

    rows = sorted(rows, key=lambda r: r["iter"])
    names = sorted({k for r in rows for k in r if k != "iter"})
    if not rows or not names:
        return None
    series = {n: [(r["iter"], float(r[n])) for r in rows if n in r] for n in names}
    # The train loss first, then the test outputs, each panel in name order.
    order = sorted(names, key=lambda n: (n != TRAIN_LOSS, n))
    colours = {n: CURVE_COLOURS[i % len(CURVE_COLOURS)] for i, n in enumerate(order)}
    panels = [("loss", LOSS_AXIS, {n: series[n] for n in order if is_loss(n)}, None),
              ("accuracy", ACCURACY_AXIS, {n: series[n] for n in order if not is_loss(n)},
               (0.0, 1.0))]
    panels = [p for p in panels if p[2]]
    iters = [r["iter"] for r in rows]
    x_ticks = nice_ticks(min(iters), max(max(iters), min(iters) + 1))
    panel = MARGIN_TOP + PANEL_HEIGHT + MARGIN_BOTTOM
    height = panel * len(panels) + PANEL_GAP * (len(panels) - 1)
    img = np.full((height, CURVE_WIDTH, 3), 255, np.uint8)
    top = MARGIN_TOP
    for title, axis, panel_series, y_range in panels:
        _panel(img, top, title, axis, panel_series, x_ticks, y_range, colours)
        top += PANEL_HEIGHT + MARGIN_BOTTOM + PANEL_GAP + MARGIN_TOP
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        return None
    path = Path(path)
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
    out += ["| " + " | ".join(sig(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def final_line(final: dict[str, Any] | None, weights: str | None, *, data_root: str) -> str:
    """The flow's last log line: top-1/top-5 and the final weights, or what was done."""
    if not final:
        return f"pipeline finished (no evaluation in this run); data root {data_root}"
    t1, t5 = final.get("top1"), final.get("top5")
    return (f"pipeline finished: top-1 = {sig(t1) if t1 is not None else 'n/a'}, "
            f"top-5 = {sig(t5) if t5 is not None else 'n/a'} on the val LMDB; "
            f"final weights {weights}")


def announce(line: str, payload: dict[str, Any], event: str = RESULT_EVENT) -> None:
    """Emit `event` about the current flow run, named `line`, with `payload` (top-1, top-5,
    weights; or the failure: what an automation would trigger on), and send it now: the
    watcher stops listening for events at the run's final state, and would otherwise show a
    failed run as just "Failed"."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    run_id = str(ctx.flow_run.id)
    emit_event(event=event,
               resource={"prefect.resource.id": RESULT_RESOURCE.format(flow_run_id=run_id),
                         "prefect.resource.name": line},
               related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}",
                         "prefect.resource.role": "flow-run"}],
               payload=payload)
    # Sent before the flow returns (and the run reaches its final state); never wait forever
    # on a server that went away.
    flush = threading.Thread(target=EventsWorker.instance().wait_until_empty, daemon=True)
    flush.start()
    flush.join(EVENT_FLUSH_TIMEOUT_S)


def summary_markdown(
    runs: Sequence[StageRun],
    *,
    data_root: str,
    datasets: dict[str, dict[str, Any]],
    final: dict[str, Any] | None,
    outputs: dict[str, str],
    curve: Path | None,
    notes: Sequence[str] = (),
) -> str:
    """The end-of-run summary artifact; `notes`: what the listings stage found and did not use
    (empty class folders, stray files, ...)."""
    parts = ["# imagenet pipeline summary\n", f"Data root: `{data_root}`\n", "## Stages\n",
             _md_table(stage_table_rows(runs))]
    if datasets:
        parts += ["\n## Datasets\n", _md_table([{"set": k, **v} for k, v in datasets.items()])]
    if notes:
        parts += ["\n## Notes on the data\n", *[f"- {note}\n" for note in notes]]
    if final:
        t1, t5 = final.get("top1"), final.get("top5")
        parts += ["\n## Final accuracy (val LMDB)\n",
                  f"- top-1: **{sig(t1)}**\n" if t1 is not None else "- top-1: n/a\n",
                  f"- top-5: **{sig(t5)}**\n" if t5 is not None else "- top-5: n/a\n"]
    if outputs:
        parts += ["\n## Outputs\n", *[f"- {k}: `{v}`\n" for k, v in outputs.items()]]
    if curve is not None:
        parts += ["\n## Training curve\n",
                  "The training loss of sampled iterations' batches and the test outputs at "
                  "each test interval, against the iteration.\n\n",
                  f"![training curve]({png_data_url(curve)})\n"]
    return "".join(parts)


def _short(text: str, limit: int = SHORT_WHY) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def stopped_summary_markdown(
    runs: Sequence[StageRun],
    *,
    state: str,
    message: str,
    stage: str | None,
    stopped: Sequence[tuple[str, str]],
    not_reached: Sequence[str],
    data_root: str,
    changes: Sequence[str] = (),
    rerun: str = "",
    failed: Sequence[tuple[str, str]] = (),
) -> str:
    """The summary artifact of a run that ended Failed or Cancelled: what ran (and what came
    from the cache), which stage stopped and why (the headline), the other stages that failed
    or were stopped beside it, and what a rerun does."""
    rows = stage_table_rows(runs)
    dash = {"this run (s)": "-", "work (s)": "-", "throughput": "-"}
    if stage:
        rows.append({"stage": stage, "status": state.lower(), "why": "the message above", **dash})
    for name, why in failed:
        rows.append({"stage": name, "status": "failed", "why": _short(why), **dash})
    for name, _ in stopped:
        rows.append({"stage": name, "status": "cancelled",
                     "why": f"stopped when {stage} {state.lower()}" if stage else "stopped",
                     **dash})
    parts = [f"# imagenet pipeline summary: {state}\n", f"Data root: `{data_root}`\n\n",
             f"**{message}**\n", "\n## Stages\n", _md_table(rows)]
    if changes:
        parts += ["\n## Changed in this run\n", *[f"- {c}\n" for c in changes]]
    finished = [run.name for run in runs]
    again = ([stage] if stage else []) + [n for n, _ in failed] + [n for n, _ in stopped]
    parts.append("\n## What a rerun does\n")
    if finished:
        parts.append(f"- reuses what finished (cached): {', '.join(finished)}\n")
    if rerun:
        parts.append(f"- {rerun}\n")
    elif again:
        parts.append(f"- runs again: {', '.join(again)}"
                     + (" (once the cause above is fixed)\n" if state == "Failed" else "\n"))
    if not_reached:
        parts.append(f"- then the stages this run did not reach: {', '.join(not_reached)}\n")
    return "".join(parts)
