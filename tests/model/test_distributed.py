"""Multi-process training (model/distributed.py + the Solver's multi-process paths) on CPU:
2 processes on 127.0.0.1 joined by jax.distributed (gloo collectives), one device each, against
1 process with 2 host devices and 1 process with 1 device at the same global batch; a stop
request on one process stops both at the same iteration; resume needs the same process count.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.errors import ImagenetError
from model import distributed
from model.caffemodel import load_caffemodel
from test_train_tiny import SOLVER, child_env, make_tiny

# Snapshots every 5 iterations, a test net, crops, mirrors and dropout (the tiny net) active.
MP_SOLVER = SOLVER.replace("snapshot: 0", "snapshot: 5") + "test_iter: 2\ntest_interval: 5\n"
STOP_AT = 3          # process 1 asks to stop after this iteration ...
AGREED_STOP = 5      # ... both stop (and snapshot) one iteration after the vote that sees it
MAX_ITER = 10
PROCESSES = 2
TIMEOUT_S = 300

# Process I of 2: train with process 1 sending itself SIGTERM after STOP_AT, then resume.
WORKER = r"""
import json, os, signal, sys
from model import distributed
from model.train import train
port, pid, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert distributed.join(f"127.0.0.1:{port}", 2, pid) == 2
def progress(it, max_iter):
    if pid == 1 and it == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
first = train("solver.prototxt", workdir=".", log=lambda l: None, on_progress=progress)
second = train("solver.prototxt", workdir=".", log=lambda l: None,
               snapshot=f"tiny_iter_{first.final_iter}.solverstate")
print(json.dumps({"first": first.final_iter, "second": second.final_iter,
                  "snapshot": second.last_snapshot, "losses": second.losses}))
"""

# One process with 2 host devices, the same global batch.
TWO_DEVICES = r"""
import sys
from model.train import train
train("solver.prototxt", workdir=sys.argv[1], devices="all", log=lambda l: None)
"""


def worst_rel(a: dict, b: dict) -> float:
    """max over blobs of max|a - b| / max|b| (README 11's convention)."""
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
               for layer in b for x, y in zip(a[layer], b[layer]))


@pytest.mark.slow
def test_two_processes_match_two_devices_and_one(tmp_path, tmp_path_factory) -> None:
    per_device = 4
    procs_dir = make_tiny(tmp_path / "procs", batch=per_device, solver=MP_SOLVER)
    devs_dir = make_tiny(tmp_path / "devs", batch=per_device, solver=MP_SOLVER)
    one_dir = make_tiny(tmp_path / "one", batch=per_device * PROCESSES, solver=MP_SOLVER)
    env = child_env(tmp_path_factory)
    env_devs = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                                    " --xla_force_host_platform_device_count=2").strip())
    port = distributed.free_port()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(STOP_AT)],
                                cwd=procs_dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    devs = subprocess.Popen([sys.executable, "-c", TWO_DEVICES, str(devs_dir)], env=env_devs,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from model.train import train
    train("solver.prototxt", workdir=one_dir, log=lambda l: None)  # 1 device, here
    outs = [w.communicate(timeout=TIMEOUT_S) for w in workers]
    _, devs_err = devs.communicate(timeout=TIMEOUT_S)
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
    assert devs.returncode == 0, devs_err[-3000:]
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # the stop asked on process 1 alone stopped both after the same iteration, with a snapshot
    assert [r["first"] for r in res] == [AGREED_STOP] * PROCESSES
    assert [r["second"] for r in res] == [MAX_ITER] * PROCESSES
    assert res[0]["snapshot"][0].endswith(f"tiny_iter_{MAX_ITER}.caffemodel")
    assert res[1]["snapshot"] is None  # process 0 alone writes snapshots
    side = json.loads((procs_dir / f"tiny_iter_{AGREED_STOP}.resume.json").read_text())
    assert side["processes"] == PROCESSES and side["devices"] == PROCESSES
    name = f"tiny_iter_{MAX_ITER}.caffemodel"
    procs, two = load_caffemodel(procs_dir / name), load_caffemodel(devs_dir / name)
    one = load_caffemodel(one_dir / name)
    vs_devices, vs_one = worst_rel(procs, two), worst_rel(procs, one)
    print(f"2 processes vs 1 process x 2 devices: {vs_devices:.3g}; vs 1 device: {vs_one:.3g}")
    assert vs_devices <= 1e-6
    assert vs_one <= 1e-4  # the golden tolerance: only the gradient reduction order differs
    assert len(set(np.round(list(res[0]["losses"].values()), 4))) > 3  # it trained

    # a resume needs the same process count (this test process is one process)
    with pytest.raises(ImagenetError, match="2-process run; resume it with --num_processes=2"):
        train("solver.prototxt", workdir=procs_dir, log=lambda l: None,
              snapshot=f"tiny_iter_{AGREED_STOP}.solverstate")


class Cancelled(Exception):
    """What a cancelled pipeline task raises inside a callback."""


def test_cancelled_local_processes_stop_together_with_a_snapshot(tmp_path) -> None:
    """The pipeline's `processes`: a callback of run_local_processes failing (a cancelled task)
    stops every process, after one snapshot, long before max_iter; the error propagates.
    (tests/flows/test_imagenet_flow.py runs a train stage with processes=2 to the end.)"""
    run = make_tiny(tmp_path / "local", batch=2, solver=SOLVER.replace(
        f"max_iter: {MAX_ITER}", "max_iter: 100000"))
    cancel_at = 2
    lines: list[str] = []

    def cancel(it: int, max_iter: int) -> None:
        if it == cancel_at:
            raise Cancelled()

    with pytest.raises(Cancelled):
        distributed.run_local_processes(PROCESSES, "solver.prototxt", workdir=run,
                                        on_progress=cancel, log=lines.append)
    (stopped,) = run.glob("tiny_iter_*.solverstate")
    assert int(stopped.name.split("_")[-1].split(".")[0]) > cancel_at
    assert sum(l.endswith("Solving Tiny") for l in lines) == 1  # process 0's log only


def test_join_flags_go_together_and_one_process_joins_nothing() -> None:
    assert distributed.join(environ={}) == 1
    assert distributed.join("127.0.0.1:12355", 1, 0, environ={}) == 1
    with pytest.raises(ImagenetError, match="--process_id missing"):
        distributed.join("127.0.0.1:12355", 2, None, environ={})
    with pytest.raises(ImagenetError, match="--process_id missing"):  # not --coordinator
        distributed.join(None, 2, None, environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ImagenetError, match="expected HOST:PORT"):
        distributed.join("127.0.0.1", 2, 0, environ={})
    with pytest.raises(ImagenetError, match="ids run from 0 to num_processes - 1"):
        distributed.join("127.0.0.1:12355", 2, 2, environ={})


def test_cluster_detection_needs_several_processes() -> None:
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert distributed.detected_cluster(slurm) == "SLURM"
    assert distributed.detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7"}) is None  # an salloc shell
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_RANK": "0"}
    assert distributed.detected_cluster(ompi) == "Open MPI"


def test_cli_refuses_half_given_process_flags(tmp_path, monkeypatch, capsys) -> None:
    from flows.cli import main
    run = make_tiny(tmp_path / "cli")
    monkeypatch.chdir(run)
    assert main(["train", "--solver=solver.prototxt", "--coordinator=127.0.0.1:12355",
                 "--num_processes=2"]) == 1
    assert "--process_id missing" in capsys.readouterr().err


@pytest.mark.slow
def test_finetuning_in_local_processes_matches_one_process(tmp_path) -> None:
    """The pipeline's `processes` with `weights`: every process copies the same layers, so two
    processes finetune to the weights one process reaches at the same global batch."""
    from model.train import train

    per_process = 2
    source = make_tiny(tmp_path / "source", batch=per_process * PROCESSES)
    train("solver.prototxt", workdir=source, log=lambda l: None)
    (weights,) = source.glob(f"tiny_iter_{MAX_ITER}.caffemodel")
    procs = make_tiny(tmp_path / "procs", batch=per_process)
    one = make_tiny(tmp_path / "one", batch=per_process * PROCESSES)
    lines: list[str] = []
    distributed.run_local_processes(PROCESSES, "solver.prototxt", workdir=procs,
                                    weights=str(weights), log=lines.append)
    train("solver.prototxt", workdir=one, weights=str(weights), log=lambda l: None)
    assert any(weights.name in line for line in lines), lines[:20]  # process 0 says it
    name = f"tiny_iter_{MAX_ITER}.caffemodel"
    start, two = load_caffemodel(weights), load_caffemodel(procs / name)
    assert worst_rel(two, load_caffemodel(one / name)) <= 1e-4  # reduction order only
    assert worst_rel(two, start) > 1e-6  # it trained from the copied weights
