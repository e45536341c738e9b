"""Exact resume: a training subprocess killed with SIGKILL mid-run and resumed from its latest
complete snapshot ends bitwise identical to the uninterrupted run (weights, history, losses,
smoothed-loss log, test outputs). Runs on the golden AlexNet-mini (random crops, mirror, dropout all active)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.snapshot import latest_snapshot

pytestmark = pytest.mark.golden

SOLVER = """net: "net.prototxt"
test_iter: 2
test_interval: 6
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 4
display: 1
average_loss: 3
max_iter: 12
momentum: 0.9
weight_decay: 0.0005
snapshot: 6
snapshot_prefix: "run"
type: "SGD"
solver_mode: CPU
random_seed: 1701
"""

# The child: trains, logs to log.txt, and can pause at an iteration (so the parent can kill it
# at a known point) or send itself a signal.
CHILD = r"""
import json, os, signal, sys, time
from model.train import train
args = json.loads(sys.argv[1])
log = open("log.txt", "a")
def progress(it, max_iter):
    if it == args.get("pause_at"):
        open("paused", "w").close()
        time.sleep(600)
    if it == args.get("sigterm_at"):
        os.kill(os.getpid(), signal.SIGTERM)
res = train("solver.prototxt", snapshot=args.get("snapshot"), workdir=".",
            log=lambda l: (log.write(l + "\n"), log.flush()), on_progress=progress)
json.dump({"losses": res.losses, "final_iter": res.final_iter,
           "test": res.final_test_outputs}, open("result.json", "w"))
"""


def make_run_dir(golden: Path, dest: Path, solver: str = SOLVER) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("net.prototxt", "mean_64.binaryproto"):
        shutil.copy(golden / name, dest / name)
    for name in ("train_64_lmdb", "val_64_lmdb"):
        shutil.copytree(golden / name, dest / name)
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (dest / "solver.prototxt").write_text(solver)
    return dest


def child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def start(cwd: Path, cache: Path, **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=cwd,
                            env=child_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def smoothed_lines(log: str, first: int) -> list[str]:
    """'Iteration N (...), loss = L' minus the timing, and test outputs, from iteration first."""
    rows, on = [], False
    for line in log.splitlines():
        msg = line.split("] ", 1)[-1]
        if msg.startswith("Iteration "):
            it = int(msg.split()[1].rstrip(","))
            on = it >= first
            if on and "loss = " in msg:
                rows.append(f"{it}: {msg.rsplit('loss = ', 1)[1]}")
        elif on and "output #" in msg:
            rows.append(msg.strip())
    return rows


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_identical(golden, tmp_path, tmp_path_factory) -> None:
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # shared by this session's tests
    full = make_run_dir(golden, tmp_path / "full")
    finish(start(full, cache))
    killed = make_run_dir(golden, tmp_path / "killed")
    proc = start(killed, cache, pause_at=9)
    deadline = time.time() + 400
    while not (killed / "paused").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "child never reached iteration 9"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run_iter_12.caffemodel").exists()
    snap = latest_snapshot("run", killed)
    assert snap is not None and snap.solverstate.name == "run_iter_6.solverstate"
    log_before = (killed / "log.txt").read_text()
    (killed / "log.txt").unlink()
    finish(start(killed, cache, snapshot=snap.solverstate.name))
    a = json.loads((full / "result.json").read_text())
    b = json.loads((killed / "result.json").read_text())
    assert b["final_iter"] == a["final_iter"] == 12
    for it in range(6, 13):  # the resumed run's losses, the extra forward at 12 included
        assert b["losses"][str(it)] == a["losses"][str(it)], it
    assert b["test"] == a["test"]
    for suffix in (".caffemodel", ".solverstate"):
        assert (full / f"run_iter_12{suffix}").read_bytes() == \
            (killed / f"run_iter_12{suffix}").read_bytes(), suffix
    # the smoothed-loss log (average_loss 3 spans the resume point) and the test outputs
    full_log = (full / "log.txt").read_text()
    assert smoothed_lines((killed / "log.txt").read_text(), 6) == smoothed_lines(full_log, 6)
    assert "Iteration 7, lr" in log_before  # killed past the snapshot (the log trails by a step)
    # the metrics file keeps one record per iteration: the killed run's tail was dropped
    iters = [json.loads(l)["iter"] for l in (killed / "run_metrics.jsonl").read_text()
             .splitlines() if json.loads(l)["kind"] == "train"]
    assert iters == list(range(12))
    assert (killed / "run_plot.png").stat().st_size > 0
