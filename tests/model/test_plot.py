"""model/plot.py: the one training-curve plotter, behind both `<prefix>_plot.png` (model/metrics.py)
and the pipeline summary's curve (tasks/report.py)."""
from __future__ import annotations

import json

import cv2
import numpy as np

from model import plot
from model.metrics import MetricsWriter


def _image(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def test_curve_has_a_loss_and_an_accuracy_panel():
    both = [{"iter": i, "train loss": 2.3 - i / 200} for i in range(0, 301, 10)]
    both += [{"iter": i, "loss": 2.0 - i / 300, "accuracy": i / 330, "accuracy_top5": 0.5 + i / 700}
             for i in (0, 100, 200, 300)]
    two = _image(plot.curve_png(both))
    one = _image(plot.curve_png([{"iter": 0, "accuracy": 0.1}, {"iter": 10, "accuracy": 0.3}]))
    assert two.shape[1] == one.shape[1] == plot.CURVE_WIDTH
    assert two.shape[0] > 2 * one.shape[0] - plot.MARGIN_TOP
    # Nothing is drawn right of the plots except the legend rows: the legend never covers data.
    legend = two[:, plot.CURVE_WIDTH - plot.LEGEND_WIDTH + 2:]
    rows_with_ink = {y for y in range(legend.shape[0]) if (legend[y] < 200).any()}
    assert rows_with_ink and len(rows_with_ink) < legend.shape[0] / 4


def test_nothing_to_draw_and_points_that_are_not_finite():
    assert plot.curve_png([]) is None
    assert plot.curve_png([{"iter": 3}]) is None
    assert plot.curve_png([{"iter": 1, "train loss": float("nan")}]) is None
    # A loss that diverged: the finite points are drawn, on axes the NaN/inf do not stretch.
    rows = [{"iter": 0, "train loss": 2.3}, {"iter": 10, "train loss": float("inf")},
            {"iter": 20, "train loss": float("nan")}, {"iter": 5, "accuracy": 0.2}]
    assert _image(plot.curve_png(rows)).shape[1] == plot.CURVE_WIDTH


def test_nice_ticks_cover_the_range():
    assert plot.nice_ticks(0, 300) == [0, 100, 200, 300]
    assert plot.nice_ticks(0, 2.31) == [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert plot.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_trainer_plot_and_summary_curve_are_the_same_picture(tmp_path):
    """MetricsWriter's records and the pipeline's rows for the same training give one PNG."""
    from tasks import report

    writer = MetricsWriter(tmp_path / "run_metrics.jsonl", tmp_path / "run_plot.png", None)
    rows = []
    for it in range(0, 101, 20):
        writer.add({"kind": "train", "iter": it, "loss": 2.3 - it / 100, "lr": 0.01})
        rows.append({"iter": it, "train loss": 2.3 - it / 100})
    for it in (0, 50, 100):
        outputs = {"accuracy": it / 120, "loss": 2.2 - it / 110}
        writer.add({"kind": "test", "iter": it, "net": 0, "outputs": outputs})
        writer.add({"kind": "test", "iter": it, "net": 1, "outputs": {"accuracy": 0.9}})
        rows.append({"iter": it, **outputs})
    writer.plot()
    summary = report.render_curve(rows, tmp_path / "curve.png")
    assert (tmp_path / "run_plot.png").read_bytes() == summary.read_bytes()
    assert len((tmp_path / "run_metrics.jsonl").read_text().splitlines()) == 12
    assert json.loads((tmp_path / "run_metrics.jsonl").read_text().splitlines()[0])["iter"] == 0
