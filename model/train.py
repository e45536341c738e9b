"""Caffe's `caffe train` and `caffe test` (tools/caffe.cpp train() and test()) on JAX.

`train` builds the Solver, restores a --snapshot or copies --weights, and solves; `evaluate`
averages the TEST net's outputs over --iterations batches. The training code is split along
Caffe's own seams:

  model/solve.py    Solver: Init, Solve, Step, Test, Snapshot, Restore (solver.cpp)
  model/steps.py    the pure jitted functions: train_step(state, batch, hyper), forwards
  model/feed.py     the train and test nets fed from their Data / ImageData layers
  model/resume.py   resume points, --weights, the seed, the data position Caffe loses
  model/devices.py  --gpu across one or several processes
  model/stop.py     SIGINT/SIGTERM and the multi-process stop vote
  model/metrics.py  glog-style logs, printed outputs, metrics.jsonl and the plot

Where we differ from Caffe on purpose: resume is exact (the data position, test-net cursors,
seed and smoothed-loss window are stored in the snapshot's side file, model/snapshot.py);
Caffe restarts its data readers and RNG (BVLC/caffe#1059), which we reproduce only when
resuming from a Caffe-written solverstate (no side file). In multi-device runs the printed train
loss is the mean over the global batch (Caffe prints the root solver's own batch).

The names other modules and tests use are importable from here as before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.errors import ImagenetError
from data.pipeline import DEFAULT_PREFETCH, Prefetcher
from model.caffemodel import check_coverage, copy_layers
from model.devices import SOLVER_MODE_CPU, local_copy, select_devices
from model.feed import (TEST_STREAM, TRAIN_STREAM, FedNet, build_fed_net, fed_batch_size,
                        num_test_nets, stack_batches)
from model.metrics import CaffeLog, LogFn, MetricsWriter, OutputSums, fmt
from model.resume import (DataPosition, ResumePoint, choose_seed, load_weights,
                          read_resume_point, weights_paths)
from model.solve import Solver, TrainResult, update_smoothed_loss
from model.steps import (PRECISIONS, TRAIN_STEP_COMPILER_OPTIONS, TrainState, flatten_params,
                         jit_for, jit_train_step, make_forward, make_train_forward,
                         make_train_step, merge_statistics, unflatten_params)

__all__ = [
    "CaffeLog", "DataPosition", "FedNet", "LogFn", "MetricsWriter", "PRECISIONS",
    "ResumePoint", "SOLVER_MODE_CPU", "Solver", "TEST_STREAM", "TRAIN_STEP_COMPILER_OPTIONS",
    "TRAIN_STREAM", "TrainResult", "TrainState", "build_fed_net", "choose_seed", "evaluate",
    "fed_batch_size", "flatten_params", "fmt", "jit_for", "jit_train_step", "local_copy",
    "make_forward",
    "make_train_forward", "make_train_step", "merge_statistics", "num_test_nets",
    "read_resume_point", "select_devices", "stack_batches", "train", "unflatten_params",
    "update_smoothed_loss"]


def train(solver_path: str | os.PathLike, *, snapshot: str | os.PathLike | None = None,
          weights: str | Sequence[str] | None = None,
          devices: str | Sequence[int] | None = None, stop_at_iter: int | None = None,
          log: LogFn | logging.Logger | None = None,
          on_progress: Callable[[int, int], None] | None = None,
          on_test: Callable[[int, dict[str, float]], None] | None = None,
          on_test_batch: Callable[[int, int, int], None] | None = None,
          workdir: str | os.PathLike | None = None, precision: str = "fp32",
          prefetch: int = DEFAULT_PREFETCH, workers: int | None = None) -> TrainResult:
    """Run `caffe train --solver=solver_path [--snapshot | --weights] [--gpu]`
    (tools/caffe.cpp train(): build the Solver, Restore or CopyLayers, Solve).

    Relative paths in the solver and nets (net, sources, mean files, snapshot_prefix) resolve
    against `workdir` (default: the current directory, as in Caffe). `stop_at_iter` trains up to
    that iteration, snapshots there and returns (one snapshot interval per pipeline task).
    `precision="bf16"` computes in bfloat16 with float32 master weights and optimizer state.
    `workers`: threads decoding input batches (default: one per core this process may use);
    the batches, crops and mirrors do not depend on it.
    """
    solver = Solver(solver_path, snapshot=snapshot, weights=weights, devices=devices,
                    stop_at_iter=stop_at_iter, log=log, on_progress=on_progress,
                    on_test=on_test, on_test_batch=on_test_batch, workdir=workdir,
                    precision=precision, prefetch=prefetch, workers=workers)
    with solver:
        return solver.solve()


def evaluate(model_prototxt: str | os.PathLike, weights: str | Sequence[str], iterations: int,
             devices: str | Sequence[int] | None = None, *,
             log: LogFn | logging.Logger | None = None,
             workdir: str | os.PathLike | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """`caffe test`: the TEST net's outputs averaged over `iterations` batches; `on_batch(done,
    iterations)` after each (a progress bar).

    Logs "Batch i, name = value" per batch and the averages as caffe.cpp's test() does
    ("name = mean" plus "(* w = x loss)" for loss outputs); returns {name: mean}.
    """
    from model.prototxt import read_net_parameter
    clog = CaffeLog(log)
    root = Path(workdir) if workdir is not None else Path.cwd()
    if iterations < 1:
        raise ImagenetError(f"--iterations must be >= 1, got {iterations}")
    devs = select_devices(devices)
    path = Path(model_prototxt)
    if not path.is_absolute() and not path.exists():
        path = root / path
    fed = build_fed_net(read_net_parameter(path), "TEST", root=root, seed=0, stream=TEST_STREAM,
                        n_devices=1, source_name=str(path))
    params = fed.net.init(jax.random.PRNGKey(0))
    sources = load_weights(weights, root)
    params = copy_layers(fed.net, params, sources, log=lambda m: clog(m, "net.cpp:746"))
    # Caffe scores whatever the file leaves out at its random initialisation; we refuse
    check_coverage(fed.net, sources, weights_paths(weights, root), whole_net=True)
    mesh = Mesh(np.array(devs), ("data",))
    # `caffe test` runs one device at the prototxt's batch size; several devices just hold
    # replicas
    replicated = NamedSharding(mesh, PartitionSpec())
    flat = jax.device_put(flatten_params(fed.net, params), replicated)
    fwd = jit_for(make_forward(fed, params, train=False), devs)
    clog(f"Running for {iterations} iterations.", "caffe.cpp:281")
    sums = OutputSums()
    pfs = {name: Prefetcher(src, 0, depth=min(3, iterations)) for name, src in fed.sources.items()}
    try:
        for i in range(iterations):
            hb = {name: next(p) for name, p in pfs.items()}
            loss, outs = fwd(flat, jax.device_put(stack_batches(fed, [hb]), replicated), None)
            for name, v in sums.add(loss, jax.device_get(outs)).items():
                for x in v:
                    clog(f"Batch {i}, {name} = {fmt(x)}", "caffe.cpp:304")
            if on_batch is not None:
                on_batch(i + 1, iterations)
    finally:
        for p in pfs.values():
            p.close()
        for s in fed.sources.values():
            s.close()
    clog(f"Loss: {fmt(sums.loss / np.float32(iterations))}", "caffe.cpp:309")
    result: dict[str, float] = {}
    for name, key, mean32 in sums.means(iterations):
        mean = float(mean32)
        w = fed.loss_weight.get(name, 0.0)
        msg = f"{key} = {fmt(mean)}"
        if w:
            msg += f" (* {fmt(w)} = {fmt(np.float32(w) * np.float32(mean))} loss)"
        clog(msg, "caffe.cpp:322")
        result[key] = mean
    return result

