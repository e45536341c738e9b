"""ResNet/Inception layers against real Caffe: ../shared/caffe-golden/resnet-mini (its README).

One `caffe train --solver=solver_det.prototxt --weights=init_iter_1.caffemodel` reproduced in
process (Convolution without bias, BatchNorm in TRAIN and TEST, Scale, Eltwise SUM with
coefficients, Concat, global AVE pooling, multistep lr), then `caffe test` on Caffe's snapshot.
Tolerances are AlexNet's goldens' (tests/model/test_train_golden.py: rtol 1e-4, weights atol
1e-4 x max|w|); Caffe's log prints 6 significant digits.

Measured on 2026-12-01 (AMD EPYC Zen 4, 2 cores): train losses worst rel err 3.5e-6 (the printed
digits' rounding), extra forward 1.1824359 (Caffe 1.18244), test losses at 0, 5, 10 within
1.2e-6 with equal accuracies, snapshot weights and BatchNorm statistics worst max|a-b|/max|b|
5.5e-7 (inc/5x5 bias), history 8.0e-7, caffe test 1.918159 on either snapshot (Caffe 1.91816).
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from model.caffemodel import load_caffemodel
from model.snapshot import read_solverstate
from model.train import evaluate, train

pytestmark = pytest.mark.golden

MINI = "resnet-mini"
COPY = ["net.prototxt", "solver_det.prototxt", "init_iter_1.caffemodel", "mean_64.binaryproto",
        "train_64_lmdb", "val_64_lmdb", "det_iter_10.caffemodel"]
RTOL = 1e-4  # AlexNet's golden tolerance (README section 11 of the goldens)
LR_LINE = re.compile(r"Iteration (\d+), lr = ([\d.e-]+)$")
BATCH_LINE = re.compile(r"Batch (\d+), (\S+) = ([\d.e-]+)$")


def worst_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.fixture(scope="module")
def expected(golden) -> dict:
    return json.loads((golden / MINI / "expected.json").read_text())


@pytest.fixture(scope="module")
def run(golden, tmp_path_factory):
    """Our `imagenet train` of Caffe's run, in a copy (opening an LMDB rewrites lock.mdb)."""
    wd = tmp_path_factory.mktemp("resnet_mini")
    for name in COPY:
        src = golden / MINI / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / name)
    for p in wd.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    lines: list[str] = []
    tests: dict[int, dict[str, float]] = {}
    result = train("solver_det.prototxt", weights="init_iter_1.caffemodel", workdir=wd,
                   log=lines.append, on_test=lambda it, out: tests.setdefault(it, dict(out)))
    return wd, result, lines, tests


def test_loss_curve_and_learning_rates(run, expected) -> None:
    _, result, lines, _ = run
    got = np.array([result.losses[i] for i in range(10)])
    np.testing.assert_allclose(got, expected["train_losses"], rtol=RTOL)
    lrs = {int(m[1]): float(m[2]) for m in (LR_LINE.search(l) for l in lines) if m}
    assert [lrs[i] for i in range(10)] == pytest.approx(expected["train_lr"], rel=1e-6)
    assert sum("MultiStep Status" in l for l in lines) == 2
    # Solve()'s extra TRAIN forward after max_iter: "Iteration 10, loss = 1.18244"
    final = expected["final_train_forward"]
    assert result.losses[final["iteration"]] == pytest.approx(final["loss"], rel=RTOL)


def test_test_outputs_at_0_5_and_after_training(run, expected) -> None:
    """Iteration 10's test runs after the extra TRAIN forward, whose BatchNorm statistics
    update the test net shares: Caffe's 1.86011, not caffe test's 1.91816 on the snapshot."""
    _, _, _, tests = run
    assert sorted(tests) == [0, 5, 10]
    for it, want in expected["tests"].items():
        got = tests[int(it)]
        assert (got["accuracy"], got["accuracy_top3"]) == (want["accuracy"],
                                                            want["accuracy_top3"]), it
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), it


def test_snapshot_weights_statistics_and_history(golden, run) -> None:
    """det_iter_10 holds the weights after 10 updates and the BatchNorm statistics BEFORE the
    extra forward (Caffe snapshots first), like Caffe's file."""
    wd, _, _, _ = run
    ours, caffe = load_caffemodel(wd / "det_iter_10.caffemodel"), load_caffemodel(
        golden / MINI / "det_iter_10.caffemodel")
    # Caffe's file also lists the Split layers it inserts (no blobs); compare the learnables
    caffe = {k: v for k, v in caffe.items() if v}
    assert {k for k, v in ours.items() if v} == caffe.keys()
    for layer, blobs in caffe.items():
        for i, want in enumerate(blobs):
            got = ours[layer][i]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                                       err_msg=f"{layer}/{i}")
    assert float(ours["bn_conv1"][2][0]) == pytest.approx(6.861893, rel=1e-6)
    h_ours = read_solverstate(wd / "det_iter_10.solverstate")
    h_caffe = read_solverstate(golden / MINI / "det_iter_10.solverstate")
    assert (h_ours.iter, h_ours.current_step) == (h_caffe.iter, h_caffe.current_step) == (10, 2)
    assert len(h_ours.history) == len(h_caffe.history)
    for a, b in zip(h_ours.history, h_caffe.history):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * max(np.abs(b).max(), 1e-30))


def test_caffe_test_on_caffes_snapshot(golden, run, expected) -> None:
    """`caffe test --weights=det_iter_10.caffemodel --iterations=2`, per batch and averaged, as
    caffe_test.log (our snapshot holds the same statistics: test_snapshot_... above)."""
    wd, _, _, _ = run
    want = expected["caffe_test"]
    lines: list[str] = []
    out = evaluate("net.prototxt", str(golden / MINI / "det_iter_10.caffemodel"), 2, workdir=wd,
                   log=lines.append)
    batches: dict[int, dict[str, float]] = {}
    for m in (BATCH_LINE.search(line) for line in lines):
        if m:
            batches.setdefault(int(m[1]), {})[m[2]] = float(m[3])
    for b, batch in enumerate(want["batches"]):
        assert batches[b] == pytest.approx(batch, rel=RTOL), b
    assert out == pytest.approx(want["outputs"], rel=RTOL)
