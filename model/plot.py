"""The training curve as a PNG: one plotter for `<prefix>_plot.png` (model/metrics.py) and the
pipeline summary's curve (tasks/report.py).

Two panels over one iteration axis: losses on top (train and test, on their shared scale) and
accuracies below (0 to 1), each with a labelled y axis, round ticks and its legend (each series
with its last value) in a column right of the plot, where no line can run under it. Drawn with
OpenCV, already a dependency (convert_imageset's decode and resize): antialiased lines and no
plotting library to install (matplotlib would add a dependency and seconds of import and font
cache for two line charts); Pillow's ImageDraw draws lines without antialiasing.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

NUMBER_DIGITS = 4
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


def curve_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """A PNG of the training curve from per-iteration rows ({"iter": N, name: value, ...}):
    losses in the top panel, accuracies (0..1) in the bottom one; None when there is nothing
    to draw. The legend gives each series' last value. Points that are not finite (a diverged
    loss) are left out of the lines and the axes."""
    import cv2

    rows = sorted(rows, key=lambda r: r["iter"])
    names = sorted({k for r in rows for k in r if k != "iter"})
    series = {n: [(r["iter"], float(r[n])) for r in rows if n in r and math.isfinite(r[n])]
              for n in names}
    series = {n: pts for n, pts in series.items() if pts}
    if not series:
        return None
    # The train loss first, then the test outputs, each panel in name order.
    order = sorted(series, key=lambda n: (n != TRAIN_LOSS, n))
    colours = {n: CURVE_COLOURS[i % len(CURVE_COLOURS)] for i, n in enumerate(order)}
    panels = [("loss", LOSS_AXIS, {n: series[n] for n in order if is_loss(n)}, None),
              ("accuracy", ACCURACY_AXIS, {n: series[n] for n in order if not is_loss(n)},
               (0.0, 1.0))]
    panels = [p for p in panels if p[2]]
    iters = [it for pts in series.values() for it, _ in pts]
    x_ticks = nice_ticks(min(iters), max(max(iters), min(iters) + 1))
    panel = MARGIN_TOP + PANEL_HEIGHT + MARGIN_BOTTOM
    height = panel * len(panels) + PANEL_GAP * (len(panels) - 1)
    img = np.full((height, CURVE_WIDTH, 3), 255, np.uint8)
    top = MARGIN_TOP
    for title, axis, panel_series, y_range in panels:
        _panel(img, top, title, axis, panel_series, x_ticks, y_range, colours)
        top += PANEL_HEIGHT + MARGIN_BOTTOM + PANEL_GAP + MARGIN_TOP
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes() if ok else None
