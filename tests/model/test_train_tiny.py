"""Training on a tiny synthetic net (fast to compile): 4 host devices vs 1, SIGTERM, NaN, iter_size,
the `imagenet train` / `imagenet test` commands and the flags Caffe refuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.datum import encode_datum_bytes
from data.errors import ImagenetError
from data.lmdb_io import LmdbWriter

NET = """name: "Tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 10 mirror: true mean_value: 120 scale: 0.02 }
  data_param { source: "train_lmdb" batch_size: BATCH backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 10 mean_value: 120 scale: 0.02 }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool1" top: "fc1"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "net.prototxt"
base_lr: 0.05
lr_policy: "step"
gamma: 0.5
stepsize: 4
display: 1
max_iter: 10
momentum: 0.9
weight_decay: 0.0005
snapshot: 0
snapshot_prefix: "tiny"
random_seed: 7
"""


def make_tiny(dest: Path, batch: int = 8, solver: str = SOLVER) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    with LmdbWriter(dest / "train_lmdb") as w:
        for i in range(20):
            label = i % 4
            img = rng.integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
            img[label % 3, :, label:] //= 2  # something a net can learn
            w.put(f"{i:08d}_img".encode(), encode_datum_bytes(img, label))
    (dest / "net.prototxt").write_text(NET.replace("BATCH", str(batch)))
    (dest / "solver.prototxt").write_text(solver)
    return dest


def child_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


MULTI = r"""
import json, sys
import jax
from model.train import train
assert len(jax.devices()) == 4, jax.devices()
one = train("solver.prototxt", workdir=sys.argv[1], devices=[0], log=lambda l: None)
four = train("solver.prototxt", workdir=sys.argv[2], devices="all", log=lambda l: None)
print(json.dumps({"one": one.losses, "four": four.losses}))
"""


@pytest.mark.slow
def test_four_host_devices_match_one(tmp_path, tmp_path_factory) -> None:
    """Global batch 8 as 4 devices x 2 (Caffe's per-device batch_size) vs 1 device x 8: same
    records, crops, mirrors and dropout masks, so the same losses up to reduction order."""
    solver = SOLVER + "snapshot_after_train: false\n"
    one = make_tiny(tmp_path / "one", batch=8, solver=solver)
    four = make_tiny(tmp_path / "four", batch=2, solver=solver)
    env = child_env(tmp_path_factory)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    out = subprocess.run([sys.executable, "-c", MULTI, str(one), str(four)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    a = np.array([res["one"][str(i)] for i in range(11)])
    b = np.array([res["four"][str(i)] for i in range(11)])
    worst = float(np.max(np.abs(a - b) / np.abs(a)))
    print(f"4 devices vs 1: worst relative loss difference {worst:.3g}")
    assert worst < 1e-5
    assert len(set(np.round(a, 4))) > 5  # it really trained on changing batches


def test_sigterm_snapshots_then_stops(tmp_path) -> None:
    import signal
    from model.train import train
    run = make_tiny(tmp_path / "term")
    lines: list[str] = []

    def progress(it: int, max_iter: int) -> None:
        if it == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train("solver.prototxt", workdir=run, log=lines.append, on_progress=progress)
    assert res.final_iter == 3 and res.stopped_by == "SIGTERM"
    assert (run / "tiny_iter_3.caffemodel").exists() and (run / "tiny_iter_3.resume.json").exists()
    assert any(l.endswith("Optimization stopped early.") for l in lines)


def test_sigterm_during_a_test_pass_interrupts_it_then_snapshots(tmp_path) -> None:
    """Solver::Test checks for a stop request before each batch ("Test interrupted."), then
    Step snapshots and stops: a long test pass (bvlc_alexnet: 1000 batches) does not hold a
    cancellation past its grace period. Resuming tests that iteration again, in full."""
    import signal
    from model.train import train
    run = make_tiny(tmp_path / "term-test", solver=SOLVER + "test_iter: 3\ntest_interval: 4\n")
    lines: list[str] = []
    batches: list[tuple[int, int, int]] = []

    def test_batch(it: int, batch: int, of: int) -> None:
        batches.append((it, batch, of))
        if it == 4 and batch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train("solver.prototxt", workdir=run, log=lines.append, on_test_batch=test_batch)
    assert res.stopped_by == "SIGTERM" and res.final_iter == 4
    assert batches == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (4, 1, 3)]
    assert any(l.endswith("Test interrupted.") for l in lines)
    assert (run / "tiny_iter_4.solverstate").exists()
    resumed: list[tuple[int, int, int]] = []
    train("solver.prototxt", workdir=run, log=lambda l: None,
          snapshot=str(run / "tiny_iter_4.solverstate"), stop_at_iter=5,
          on_test_batch=lambda *b: resumed.append(b))
    assert resumed == [(4, 1, 3), (4, 2, 3), (4, 3, 3)]


def test_nan_loss_stops_naming_the_iteration(tmp_path) -> None:
    from model.train import train
    run = make_tiny(tmp_path / "nan", solver=SOLVER.replace("base_lr: 0.05", "base_lr: 1e30"))
    with pytest.raises(ImagenetError, match=r"loss is (nan|inf) at iteration [1-9]"):
        train("solver.prototxt", workdir=run, log=lambda l: None)


def test_iter_size_two_of_four_equals_one_of_eight(tmp_path) -> None:
    """iter_size accumulates gradients over passes and divides by iter_size: 2 passes of 4
    records train like 1 pass of the same 8 (no random crop, mirror or dropout here)."""
    from model.train import train

    def plain(dest: Path, batch: int, iter_size: int) -> Path:
        run = make_tiny(dest, batch=batch, solver=SOLVER.replace("max_iter: 10", "max_iter: 4")
                        + f"iter_size: {iter_size}\n")
        net = (run / "net.prototxt").read_text()
        net = net.replace("crop_size: 10 mirror: true ", "").replace("crop_size: 10 ", "")
        (run / "net.prototxt").write_text(net.replace("dropout_ratio: 0.5", "dropout_ratio: 0"))
        return run

    two = plain(tmp_path / "two", 4, 2)
    one = plain(tmp_path / "one", 8, 1)
    a = train("solver.prototxt", workdir=two, log=lambda l: None)
    b = train("solver.prototxt", workdir=one, log=lambda l: None)
    side = json.loads((two / "tiny_iter_4.resume.json").read_text())
    assert side["train_batches"] == 8  # two batches per iteration
    # (Solve's extra forward at iteration 4 sees one batch_size batch: 4 vs 8 records)
    for it in range(4):
        assert a.losses[it] == pytest.approx(b.losses[it], rel=1e-5), it


def test_cli_train_then_test(tmp_path, monkeypatch, capsys) -> None:
    from flows.cli import main
    run = make_tiny(tmp_path / "cli", solver=SOLVER.replace("max_iter: 10", "max_iter: 3"))
    monkeypatch.chdir(run)
    assert main(["train", "-solver", "solver.prototxt", "--gpu=-1"]) == 0
    assert (run / "tiny_iter_3.caffemodel").exists()
    assert main(["test", "--model=net.prototxt", "--weights=tiny_iter_3.caffemodel",
                 "--iterations=5"]) == 0
    err = capsys.readouterr().err
    assert "caffe.cpp:322] accuracy = " in err and "] loss = " in err
    assert main(["train", "--solver=solver.prototxt", "--snapshot=tiny_iter_3.solverstate",
                 "--weights=tiny_iter_3.caffemodel"]) == 1
    assert "not both" in capsys.readouterr().err


def test_bf16_compute_trains_with_float32_master_weights(tmp_path) -> None:
    from model.caffemodel import load_caffemodel
    from model.train import train
    solver = SOLVER.replace("max_iter: 10", "max_iter: 3")
    a = train("solver.prototxt", workdir=make_tiny(tmp_path / "f32", solver=solver),
              log=lambda l: None)
    b = train("solver.prototxt", workdir=make_tiny(tmp_path / "bf16", solver=solver),
              log=lambda l: None, precision="bf16")
    # bfloat16 keeps 8 bits of mantissa: the losses agree to about 1e-2
    for it in range(4):
        assert b.losses[it] == pytest.approx(a.losses[it], rel=3e-2), it
    w = load_caffemodel(tmp_path / "bf16" / "tiny_iter_3.caffemodel")["fc1"][0]
    assert w.dtype == np.float32  # the snapshot holds the float32 master weights
    assert not np.array_equal(w.astype(np.dtype("float32")), w.astype(np.float16).astype(np.float32))
    with pytest.raises(ImagenetError, match="valid: fp32, bf16"):
        train("solver.prototxt", workdir=tmp_path / "f32", log=lambda l: None, precision="fp8")


def test_two_test_nets_are_run_and_averaged(tmp_path) -> None:
    """A generic net with two test_iter entries gives two TEST instances (Solver::InitTestNets),
    each averaging its outputs over its own test_iter batches and keeping its own cursor."""
    from model.train import train
    solver = (SOLVER.replace("max_iter: 10", "max_iter: 2")
              + "test_iter: 2\ntest_iter: 5\ntest_interval: 2\n")
    lines: list[str] = []
    seen: list[tuple[int, dict]] = []
    res = train("solver.prototxt", workdir=make_tiny(tmp_path / "t2", solver=solver),
                log=lines.append, on_test=lambda it, out: seen.append((it, out)))
    msgs = [l.split("] ", 1)[1] for l in lines]
    assert msgs.count("Iteration 0, Testing net (#0)") == 1
    assert msgs.count("Iteration 2, Testing net (#1)") == 1
    assert [it for it, _ in seen] == [0, 2]
    for _, out in seen:
        assert set(out) == {"accuracy", "loss", "net1/accuracy", "net1/loss"}
        # 4 images per batch: a mean over 2 (5) batches is a multiple of 1/8 (1/20)
        assert (out["accuracy"] * 8) == pytest.approx(round(out["accuracy"] * 8))
        assert (out["net1/accuracy"] * 20) == pytest.approx(round(out["net1/accuracy"] * 20))
    side = json.loads((tmp_path / "t2" / "tiny_iter_2.resume.json").read_text())
    assert side["test_batches"] == [2, 5]  # the snapshot at 2 precedes the test at 2
    assert res.final_test_outputs == seen[-1][1]


def test_a_v1_resume_file_resumes_but_says_it_is_not_exact(tmp_path) -> None:
    """Side files of the v1 format predate per-image crop/mirror draws: the resume goes on
    (weights, history, data position) and the log says the crops after it differ."""
    from model.snapshot import SIDE_FORMAT, read_side
    from model.train import train
    run = make_tiny(tmp_path / "v1", solver=SOLVER.replace("max_iter: 10", "max_iter: 4"))
    train("solver.prototxt", workdir=run, log=lambda m: None, stop_at_iter=2)
    side = run / "tiny_iter_2.resume.json"
    record = json.loads(side.read_text())
    assert record["format"] == SIDE_FORMAT
    side.write_text(json.dumps({**record, "format": "imagenet-pipeline resume v1"}))
    assert read_side(run / "tiny_iter_2.solverstate")["train_batches"] == 2
    lines: list[str] = []
    res = train("solver.prototxt", workdir=run, log=lines.append,
                snapshot="tiny_iter_2.solverstate")
    assert res.final_iter == 4
    caveat = [l for l in lines if "Resume is not exact" in l]
    assert len(caveat) == 1 and "crops and mirrors" in caveat[0]
    side.write_text(json.dumps({**record, "format": "imagenet-pipeline resume v0"}))
    with pytest.raises(ImagenetError, match="delete the side file"):
        read_side(run / "tiny_iter_2.solverstate")
