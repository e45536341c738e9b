"""Caffe's `caffe train` / `caffe test` loop on JAX: Solver::Solve, Step, TestAll, Snapshot.

Owns the training loop around a pure, jitted `train_step(state, batch, hyper)`:
- state (`TrainState`): learnable blobs in `learnable_params` order, the optimizer state
  (Caffe's history blobs), the iteration and the base RNG key. Dropout keys are
  fold_in(rng, iteration), data crops/mirrors come from data/pipeline.py keyed on
  (seed, batch index), so iteration i is a pure function of the state and i.
- batch: uint8 images + crop offsets + mirror flags + labels for each of iter_size passes;
  the DataTransformer's float work (mean, scale, mirror) runs inside the step.
- hyper: the float32 learning rate of this iteration (model/solver.py computes it on the host
  in double, like Caffe).

Around it, `Solver` has the shape of src/caffe/solver.cpp (solve, step, test_all/test,
snapshot, restore: one method per Caffe function) and its order: test at
iter % test_interval == 0 (iteration 0 only with test_initialization), forward/backward
iter_size times, smoothed loss over average_loss, display "Iteration N (x iter/s, ys/D iters),
loss = L" + net outputs, ApplyUpdate with "Iteration N, lr = R", ++iter, snapshot every
`snapshot` iterations; after max_iter a snapshot (snapshot_after_train), one more TRAIN forward
printed as "Iteration N, loss = L" (which, as a TRAIN forward, updates BatchNorm's running
statistics after the snapshot), the final test and "Optimization Done.". Logs carry glog-style
prefixes so Caffe's tools/extra/parse_log.py reads them. Beside the snapshots:
`<prefix>_metrics.jsonl` and `<prefix>_plot.png`.

Data parallelism, as Caffe's multi-GPU P2PSync: the global batch is batch_size x devices, split
along N over a one-axis mesh; params and optimizer state are replicated and XLA all-reduces the
gradients. The devices may belong to several processes (hosts) joined by model/distributed.py:
each process then reads only its share of every global batch (data/pipeline.py read_part), in
the order one process would read it, and process 0 alone logs, tests and snapshots.

Where we differ from Caffe on purpose: resume is exact (the data position, test-net cursors,
seed and smoothed-loss window are stored in the snapshot's side file, model/snapshot.py);
Caffe restarts its data readers and RNG (BVLC/caffe#1059), which we reproduce only when
resuming from a Caffe-written solverstate (no side file). In multi-device runs the printed train
loss is the mean over the global batch (Caffe prints the root solver's own batch).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError
from data.pipeline import (DEFAULT_PREFETCH, SOURCE_TYPES, BatchSource, HostBatch, Prefetcher,
                           open_source)
from data.proto import caffe_pb2
from data.transform import transform_batch
from model import snapshot as snap
from model.caffemodel import copy_layers, load_caffemodel, net_to_proto
from model.net import Net, Params
from model.solver import CaffeSolver, build_solver, read_solver

LogFn = Callable[[str], None]
PRECISIONS = ("fp32", "bf16")
# Streams of the counter-based data RNG: the train net, then test net k at TEST_STREAM + k.
TRAIN_STREAM = 0
TEST_STREAM = 1
# Caffe's solver_mode enum value for CPU (caffe.proto SolverParameter.SolverMode).
SOLVER_MODE_CPU = 0
# Points of the loss/accuracy plot and its size in pixels.
PLOT_SIZE = (900, 500)


# ----------------------------------------------------------------------------- logging

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


# ----------------------------------------------------------------------------- devices

def select_devices(devices: str | Sequence[int] | None, solver_mode: int | None = None,
                   device_id: int = 0) -> list[jax.Device]:
    """--gpu semantics: "all", a list of indices, [-1] (CPU), or None (the solver_mode
    default: the first device). With several processes (jax.distributed) every process applies
    the same choice to its own local devices; the result lists them all, process by process,
    so each process's devices hold one contiguous share of the global batch."""
    if jax.process_count() == 1:
        return _select_among(jax.devices(), jax.devices("cpu"), devices, solver_mode, device_id)
    chosen: list[jax.Device] = []
    for p in range(jax.process_count()):
        local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        cpus = sorted((d for d in jax.devices("cpu") if d.process_index == p),
                      key=lambda d: d.id)
        chosen += _select_among(local, cpus, devices, solver_mode, device_id)
    per_process = Counter(d.process_index for d in chosen)
    if len(set(per_process.values())) != 1:
        raise ImagenetError(f"processes have different device counts {dict(per_process)}: "
                            "give every process the same number of devices (--gpu)")
    return chosen


def _select_among(avail: Sequence[jax.Device], cpus: Sequence[jax.Device],
                  devices: str | Sequence[int] | None, solver_mode: int | None,
                  device_id: int) -> list[jax.Device]:
    """select_devices on one list of devices (one process's, or all with one process)."""
    if devices is None:
        # caffe.cpp: without --gpu the solver's solver_mode decides (GPU: device_id)
        if solver_mode == SOLVER_MODE_CPU:
            return [cpus[0]]
        return [avail[device_id] if 0 <= device_id < len(avail) else avail[0]]
    if isinstance(devices, str):
        if devices == "all":
            return list(avail)
        devices = [int(d) for d in devices.split(",") if d.strip()]
    devices = list(devices)
    if devices == [-1]:
        return [cpus[0]]
    bad = [d for d in devices if not 0 <= d < len(avail)]
    if bad or not devices:
        raise ImagenetError(f"device ids {devices} invalid; {len(avail)} devices available: "
                            f"{', '.join(str(d) for d in avail)}")
    if len(set(devices)) != len(devices):
        raise ImagenetError(f"device ids repeated: {devices}")
    return [avail[d] for d in devices]


def local_copy(tree: Any) -> Any:
    """This process's copy of replicated arrays: with several processes a global array spans
    devices this process cannot read, but every process holds all of a replicated one."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)


# ----------------------------------------------------------------------------- nets + data

@dataclass
class FedNet:
    """A net whose Data / ImageData layers are fed from their sources (data/pipeline.py)."""

    net: Net
    sources: dict[str, BatchSource]  # input layer name -> source
    means: dict[str, np.ndarray | None]
    loss_weight: dict[str, float]   # output blob -> loss weight


def _net_param(solver: caffe_pb2.SolverParameter, root: Path, which: str, k: int = 0
               ) -> tuple[caffe_pb2.NetParameter, str]:
    """Solver::InitTrainNet / InitTestNets: the NetParameter for the train net or test net k."""
    from model.prototxt import read_net_parameter
    if which == "train":
        if solver.HasField("train_net_param"):
            return solver.train_net_param, "train_net_param"
        if solver.HasField("train_net"):
            return read_net_parameter(root / solver.train_net), solver.train_net
        if solver.HasField("net_param"):
            return solver.net_param, "net_param"
        if solver.HasField("net"):
            return read_net_parameter(root / solver.net), solver.net
        raise ImagenetError("the solver names no net (net, net_param, train_net or "
                            "train_net_param)")
    specific = list(solver.test_net_param) + [None] * len(solver.test_net)
    if k < len(solver.test_net_param):
        return solver.test_net_param[k], f"test_net_param[{k}]"
    if k < len(specific):
        path = solver.test_net[k - len(solver.test_net_param)]
        return read_net_parameter(root / path), path
    if solver.HasField("net_param"):
        return solver.net_param, "net_param"
    return read_net_parameter(root / solver.net), solver.net


def num_test_nets(solver: caffe_pb2.SolverParameter) -> int:
    """Solver::InitTestNets: specific test nets (test_net_param, test_net) plus, with a generic
    net or net_param, one generic instance per remaining test_iter entry."""
    specific = len(solver.test_net_param) + len(solver.test_net)
    generic = solver.HasField("net") or solver.HasField("net_param")
    n_iter = len(solver.test_iter)
    if (n_iter < specific) if generic else (n_iter != specific):
        raise ImagenetError(f"test_iter must be specified for each test network: "
                            f"{n_iter} test_iter for {specific} test_net/test_net_param")
    n = n_iter if generic else specific
    if len(solver.test_state) and len(solver.test_state) != n:
        raise ImagenetError(f"test_state must be unspecified or specified once per test net: "
                            f"{len(solver.test_state)} test_state for {n} test nets")
    return n


def build_fed_net(net_param: caffe_pb2.NetParameter, phase: str, *, root: Path, seed: int,
                  stream: int, n_devices: int, state: caffe_pb2.NetState | None = None,
                  source_name: str | None = None, part: tuple[int, int] = (0, 1)) -> FedNet:
    """A Net plus sources for its Data and ImageData layers, shapes taken from the data (global
    batch = batch_size x devices, as Caffe's multi-GPU). part=(p, P): this process reads part
    p of P of every global batch (multi-process training); the net keeps the global shapes."""
    from model.prototxt import filter_net
    stages = list(state.stage) if state is not None else []
    level = int(state.level) if state is not None else 0
    filtered = filter_net(net_param, phase, level=level, stages=stages)
    sources: dict[str, BatchSource] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for lp in filtered.layer:
        if lp.type in SOURCE_TYPES:
            src = open_source(lp, train=(phase == "TRAIN"), seed=seed, stream=stream,
                              batch_multiplier=n_devices, root=root)
            sources[lp.name] = src
            if part[1] > 1:
                src.read_part(*part)
            first = src.batch(0)
            shapes[lp.top[0]] = (src.batch_size, *first.images.shape[1:])
            if len(lp.top) > 1:
                shapes[lp.top[1]] = (src.batch_size,)
        elif lp.type in ("Input",) and n_devices > 1:
            raise ImagenetError(f"layer {lp.name!r}: Input layers cannot be fed in training")
    try:
        net = Net(net_param, phase, stages=stages, level=level, input_shapes=shapes,
                  source=source_name)
        for spec in net.inputs:
            if spec.layer_name not in sources:
                raise ImagenetError(f"layer {spec.layer_name!r} ({spec.type}): only "
                                    f"{' and '.join(sorted(SOURCE_TYPES))} layers can feed a "
                                    "training or test net")
    except BaseException:
        for src in sources.values():
            src.close()
        raise
    for src in sources.values():
        # Every batch's labels are checked where it is built, against the layers reading them.
        src.label_checks = tuple(net.label_checks(src.tops[1])) if len(src.tops) > 1 else ()
    means = {name: s.mean(shapes[s.tops[0]][1]) for name, s in sources.items()}
    loss_weight: dict[str, float] = {}
    for layer in net.layers:
        for top, w in zip(layer.param.top, layer.loss_weights):
            loss_weight[top] = float(w)
    return FedNet(net=net, sources=sources, means=means, loss_weight=loss_weight)


def stack_batches(fed: FedNet, batches: Sequence[Mapping[str, HostBatch]]) -> dict[str, Any]:
    """Host arrays of one step: per Data layer, iter_size batches stacked on axis 0."""
    out: dict[str, Any] = {}
    for name in fed.sources:
        parts = [b[name] for b in batches]
        out[name] = {"images": np.stack([p.images for p in parts]),
                     "offsets": np.stack([p.offsets for p in parts]),
                     "mirror": np.stack([p.mirror for p in parts]),
                     "labels": np.stack([p.labels for p in parts])}
    return out


def _net_inputs(fed: FedNet, arrays: Mapping[str, Any], k: int, dtype: Any) -> dict[str, Any]:
    """The Data tops of pass k: device-side DataTransformer output and labels."""
    feed: dict[str, Any] = {}
    for name, src in fed.sources.items():
        a = arrays[name]
        data = transform_batch(a["images"][k], a["offsets"][k], a["mirror"][k], fed.means[name],
                               src.plan.scale)
        feed[src.tops[0]] = data.astype(dtype)
        if len(src.tops) > 1:
            feed[src.tops[1]] = a["labels"][k]
    return feed


# ----------------------------------------------------------------------------- the step

class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    params: tuple      # learnable blobs, learnable_params order
    opt_state: Any     # the optimizer's state (Caffe's history blobs at its end)
    iteration: jax.Array
    rng: jax.Array     # base key; iteration i uses fold_in(rng, i)


def flatten_params(net: Net, params: Params) -> tuple:
    return tuple(jnp.asarray(params[r.layer][r.index], jnp.float32) for r in net.learnable_params)


def unflatten_params(net: Net, flat: Sequence[Any], template: Params) -> Params:
    out: Params = {name: [None] * len(blobs) for name, blobs in template.items()}
    for ref, value in zip(net.learnable_params, flat):
        out[ref.layer][ref.index] = value
    return out


def merge_statistics(net: Net, flat: tuple, updates: Mapping[str, Sequence[Any]]) -> tuple:
    """The flat params with the blobs a TRAIN forward wrote itself (BatchNorm's running
    statistics, Net.apply_with_updates) replaced by their new values."""
    if not updates:
        return flat
    out = list(flat)
    for i, r in enumerate(net.learnable_params):
        if not r.learnable and r.layer in updates:
            out[i] = updates[r.layer][r.index].astype(jnp.float32)
    return tuple(out)


# XLA options for the jitted train step (jax.jit's compiler_options). Region analysis in copy
# insertion: without it XLA:CPU copied every donated weight blob before the update wrote it in
# place (bvlc_alexnet: 243 MB per step, 10-20 ms of a 905-935 ms step on the 2-core Zen 4;
# benchmarks/README.md).
TRAIN_STEP_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def make_train_step(fed: FedNet, solver: CaffeSolver, template: Params, *,
                    precision: str = "fp32") -> Callable:
    """train_step(state, batch, hyper) -> (new_state, metrics); pure, jit it.

    batch: stack_batches output (iter_size passes); hyper: {"lr", "adam_correction"} float32.
    metrics: {"loss": mean loss over the passes, "outputs": the last pass's net outputs}.
    """
    if precision not in PRECISIONS:
        raise ImagenetError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    net = fed.net
    iter_size = int(solver.param.iter_size)
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32
    refs = net.learnable_params
    frozen = [i for i, r in enumerate(refs) if not r.learnable]

    def loss_fn(flat, feed, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        tops, loss, updates = net.apply_with_updates(p, feed, rng, train=True)
        return loss.astype(jnp.float32), (tops, updates)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, Any], hyper: Mapping[str, Any]
                   ) -> tuple[TrainState, dict[str, Any]]:
        flat = state.params
        step_rng = jax.random.fold_in(state.rng, state.iteration)
        total_loss = jnp.float32(0)
        grads = None
        tops: dict[str, Any] = {}
        for k in range(iter_size):
            feed = _net_inputs(fed, batch, k, compute)
            (loss, (tops, updates)), g = grad_fn(flat, feed, jax.random.fold_in(step_rng, k))
            # Caffe accumulates diffs over the iter_size passes, then Normalize divides
            grads = g if grads is None else tuple(a + b for a, b in zip(grads, g))
            total_loss = total_loss + loss
            flat = merge_statistics(net, flat, updates)
        new_params, opt_state = solver.update(grads, state.opt_state, flat, hyper)
        if frozen:
            new_params = tuple(flat[i] if i in frozen else p for i, p in enumerate(new_params))
        metrics = {"loss": total_loss / jnp.float32(iter_size),
                   "outputs": {k: v.astype(jnp.float32) for k, v in tops.items()}}
        return TrainState(new_params, opt_state, state.iteration + 1, state.rng), metrics

    return train_step


def make_forward(fed: FedNet, template: Params, *, train: bool, precision: str = "fp32"
                 ) -> Callable:
    """forward(flat_params, batch, rng) -> (loss, outputs) for one pass (k = 0)."""
    net = fed.net
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32

    def forward(flat, batch, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        feed = _net_inputs(fed, batch, 0, compute)
        tops, loss = net.apply(p, feed, rng, train=train)
        return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in tops.items()}

    return forward


def make_train_forward(fed: FedNet, template: Params, *, precision: str = "fp32") -> Callable:
    """forward(flat_params, batch, rng) -> (loss, flat_params with the statistics this TRAIN
    forward wrote): a Net::Forward in TRAIN, which updates BatchNorm's running statistics
    (batch_norm_layer.cpp) without any parameter update."""
    net = fed.net
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32

    def forward(flat, batch, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        feed = _net_inputs(fed, batch, 0, compute)
        _, loss, updates = net.apply_with_updates(p, feed, rng, train=True)
        return loss.astype(jnp.float32), merge_statistics(net, flat, updates)

    return forward


# ----------------------------------------------------------------------------- results

@dataclass
class TrainResult:
    final_iter: int
    last_snapshot: tuple[str, str] | None  # (caffemodel, solverstate)
    metrics_path: str
    plot_path: str
    final_test_outputs: dict[str, float]  # net 0 by output name, net k as "net<k>/name"
    seconds: float
    images_per_second: float
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> loss of its forward
    stopped_by: str | None = None  # the stop request (a signal name) that ended it early


class _StopRequest:
    """While active, SIGINT/SIGTERM call `request(signal name)`: the Solver snapshots, then
    stops (Caffe's --sigint_effect; Solve snapshots after an early exit because
    snapshot_after_train defaults to true). Handlers exist only in the main thread."""

    def __init__(self, request: Callable[[str], None]) -> None:
        self.request = request
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _output_lines(outputs: Mapping[str, np.ndarray], loss_weight: Mapping[str, float],
                  scale: float = 1.0) -> list[tuple[str, float, float]]:
    """Net outputs flattened element-wise as Caffe prints them: (name, value, loss weight)."""
    rows = []
    for name, value in outputs.items():
        for v in np.asarray(value, np.float32).ravel():
            rows.append((name, float(np.float32(v) * np.float32(scale)), loss_weight.get(name, 0)))
    return rows


def _out_msg(kind: str, j: int, name: str, value: float, weight: float) -> str:
    msg = f"    {kind} net output #{j}: {name} = {fmt(value)}"
    if weight:
        msg += f" (* {fmt(weight)} = {fmt(np.float32(weight) * np.float32(value))} loss)"
    return msg


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


# ----------------------------------------------------------------------------- train()

def _load_weights(spec: str | Sequence[str], root: Path) -> list[dict[str, list[np.ndarray]]]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        p = Path(n) if Path(n).is_absolute() else root / n
        out.append(load_caffemodel(p))
    return out



def update_smoothed_loss(losses: list[float], smoothed: np.float32, loss: np.float32,
                         step: int, average_loss: int) -> np.float32:
    """Solver::UpdateSmoothedLoss (solver.cpp): the mean of the last `average_loss` losses,
    kept in float32 as Caffe does; `losses` is the ring buffer (updated in place), `step` the
    number of iterations since the run (or resume) started."""
    if len(losses) < average_loss:
        losses.append(float(loss))
        return np.float32((smoothed * np.float32(len(losses) - 1) + loss)
                          / np.float32(len(losses)))
    idx = step % average_loss
    smoothed = np.float32(smoothed + (loss - np.float32(losses[idx])) / np.float32(average_loss))
    losses[idx] = float(loss)
    return smoothed

# ----------------------------------------------------------------------------- the Solver

def train(solver_path: str | os.PathLike, *, snapshot: str | os.PathLike | None = None,
          weights: str | Sequence[str] | None = None,
          devices: str | Sequence[int] | None = None, stop_at_iter: int | None = None,
          log: LogFn | logging.Logger | None = None,
          on_progress: Callable[[int, int], None] | None = None,
          on_test: Callable[[int, dict[str, float]], None] | None = None,
          on_test_batch: Callable[[int, int, int], None] | None = None,
          workdir: str | os.PathLike | None = None, precision: str = "fp32",
          prefetch: int = DEFAULT_PREFETCH) -> TrainResult:
    """Run `caffe train --solver=solver_path [--snapshot | --weights] [--gpu]`
    (tools/caffe.cpp train(): build the Solver, Restore or CopyLayers, Solve).

    Relative paths in the solver and nets (net, sources, mean files, snapshot_prefix) resolve
    against `workdir` (default: the current directory, as in Caffe). `stop_at_iter` trains up to
    that iteration, snapshots there and returns (one snapshot interval per pipeline task).
    `precision="bf16"` computes in bfloat16 with float32 master weights and optimizer state.
    """
    solver = Solver(solver_path, snapshot=snapshot, weights=weights, devices=devices,
                    stop_at_iter=stop_at_iter, log=log, on_progress=on_progress,
                    on_test=on_test, on_test_batch=on_test_batch, workdir=workdir,
                    precision=precision, prefetch=prefetch)
    with solver:
        return solver.solve()


@dataclass(frozen=True)
class ResumePoint:
    """A snapshot to resume from, read before the nets are built: its side file fixes the
    seed, which the fillers and the data order depend on."""

    given: str          # the --snapshot argument, as logged
    solverstate: Path
    state: snap.SolverStateData
    caffemodel: Path
    side: dict[str, Any] | None  # None: written by real Caffe (no exact-resume record)


def read_resume_point(snapshot: str | os.PathLike, root: Path, n_devices: int,
                      processes: int = 1) -> ResumePoint:
    """The .solverstate, its learned_net and our side file; refuses a side file written with
    another device count (the global batch, hence the data order, would differ) or another
    process count."""
    path = Path(snapshot)
    if not path.is_absolute() and not path.exists():
        path = root / path
    state = snap.read_solverstate(path)
    if not state.learned_net:
        raise ImagenetError(f"{path}: no learned_net (HDF5 snapshots are not supported)")
    learned = snap.resolve_learned_net(state.learned_net, path, root)
    side = snap.read_side(path, learned)
    if side is not None and side.get("processes", 1) != processes:
        raise ImagenetError(f"{path} was written by a {side.get('processes', 1)}-process run; "
                            f"resume it with --num_processes={side.get('processes', 1)} (got "
                            f"{processes}): every process reads its share of each batch")
    if side is not None and side.get("devices", n_devices) != n_devices:
        raise ImagenetError(f"{path} was written by a {side['devices']}-device run; "
                            f"resume it on {side['devices']} devices (got {n_devices}) so the "
                            "global batch and data order stay the same")
    return ResumePoint(given=str(snapshot), solverstate=path, state=state, caffemodel=learned,
                       side=side)


def choose_seed(param: caffe_pb2.SolverParameter, resume: ResumePoint | None) -> int:
    """The run's seed: the resumed run's, else random_seed, else random (Caffe's default -1)."""
    if resume is not None and resume.side is not None:
        return int(resume.side["seed"])
    if param.random_seed >= 0:
        return int(param.random_seed)
    return int.from_bytes(os.urandom(4), "little")


@dataclass
class DataPosition:
    """Host bookkeeping of Solver::Step that Caffe loses on resume and we keep (side file):
    batches consumed by the train net and each test net, and UpdateSmoothedLoss's window."""

    train_batches: int = 0
    test_batches: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: np.float32 = field(default_factory=lambda: np.float32(0))
    start_iter: int = 0  # where the smoothing window's ring index counts from


@dataclass
class _Pending:
    """An iteration dispatched to the device whose loss the host has not read yet."""

    it: int
    metrics: Any
    hyper: dict[str, Any]
    display: bool
    multistep: str
    vote: Any = None  # multi-process: whether any process asked to stop (a device array)


def _discard(line: str) -> None:
    """The log of processes other than 0 (process 0 alone logs, as Caffe's root solver)."""


class Solver:
    """Caffe's Solver (src/caffe/solver.cpp) around the jitted `train_step`.

    The constructor is Solver::Init (solver parameters, seed, InitTrainNet, InitTestNets) plus
    caffe.cpp train()'s --weights (CopyLayers) and --snapshot (Restore). Then:
      solve()    Solver::Solve      step to max_iter, final snapshot, forward and test
      step(n)    Solver::Step       n iterations: test, forward/backward, display, update
      test_all() Solver::TestAll    every test net, via test(k) = Solver::Test
      snapshot() Solver::Snapshot   .caffemodel + .solverstate + our resume side file
      restore(p) Solver::Restore    weights, history, iteration and data position
    Hooks for callers: on_progress(iter, max_iter) after each update, on_test(iter, outputs)
    after each TestAll, on_test_batch(iter, batch, of) after each test batch (a test pass can
    take longer than the training between two), request_stop(reason) (SIGINT/SIGTERM call it)
    to snapshot and stop, also in the middle of a test pass.
    Use it as a context manager (or call close()): the LMDB readers close on every path out.

    With several processes (model/distributed.py joined them) each process feeds its devices'
    share of every global batch and the step's gradient reduction spans all devices. Process 0
    alone logs, tests (on its first device, like Caffe's root solver) and snapshots; a stop
    request on any process stops all of them at the same iteration (`_vote`).
    """

    def __init__(self, solver_path: str | os.PathLike, *,
                 snapshot: str | os.PathLike | None = None,
                 weights: str | Sequence[str] | None = None,
                 devices: str | Sequence[int] | None = None, stop_at_iter: int | None = None,
                 log: LogFn | logging.Logger | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_test: Callable[[int, dict[str, float]], None] | None = None,
                 on_test_batch: Callable[[int, int, int], None] | None = None,
                 workdir: str | os.PathLike | None = None, precision: str = "fp32",
                 prefetch: int = DEFAULT_PREFETCH) -> None:
        self.t_start = time.time()
        self.processes, self.process = jax.process_count(), jax.process_index()
        self.is_root = self.process == 0
        self.log = CaffeLog(log if self.is_root else _discard)
        self.root = Path(workdir) if workdir is not None else Path.cwd()
        path = Path(solver_path)
        self.solver_path = path if path.is_absolute() or path.exists() else self.root / path
        if snapshot is not None and weights:
            raise ImagenetError("Give a snapshot to resume training or weights to finetune but "
                                "not both.")
        self.param = sp = read_solver(str(self.solver_path))
        self.devices = select_devices(devices, int(sp.solver_mode), int(sp.device_id))
        self.log("Use CPU." if self.devices[0].platform == "cpu"
                 else f"Using devices {self.devices}", "caffe.cpp:197")
        resume = (read_resume_point(snapshot, self.root, len(self.devices), self.processes)
                  if snapshot is not None else None)
        self.seed = choose_seed(sp, resume)
        self.precision, self.prefetch = precision, prefetch
        self.on_progress, self.on_test = on_progress, on_test
        self.on_test_batch = on_test_batch
        self.max_iter = int(sp.max_iter)
        self.stop_iter = (self.max_iter if stop_at_iter is None
                          else min(int(stop_at_iter), self.max_iter))
        self.iter, self.current_step = 0, 0
        self.requested_stop: str | None = None  # asked here (a signal, a caller)
        self.agreed_stop: str | None = None     # multi-process: what all processes act on
        self.last_snapshot: tuple[str, str] | None = None
        self.final_test: dict[str, float] = {}
        self.loss_log: dict[int, float] = {}
        self.images = 0
        self.opened: list[FedNet] = []
        try:
            self.log("Initializing solver from parameters: \n" + str(sp), "solver.cpp:45")
            self._init_nets()
            self._init_params(weights)
            self._init_state()
            self.position = DataPosition(test_batches=[0] * self.n_tests)
            if resume is not None:
                self.restore(resume)
            self.prefix = self._snapshot_prefix()
            # process 0 alone writes snapshots, so it alone sweeps their temporaries
            leftovers = (snap.remove_snapshot_temps(self.prefix_str, self.root)
                         if self.is_root else [])
            for leftover in leftovers:
                self.log(f"Removed {leftover.name}, left by an interrupted snapshot",
                         "solver.cpp:0")
            self.metrics = MetricsWriter(
                self.prefix.with_name(self.prefix.name + "_metrics.jsonl"),
                self.prefix.with_name(self.prefix.name + "_plot.png"),
                self.iter if resume is not None else 0, enabled=self.is_root)
        except BaseException:
            self.close()
            raise

    # ---- Solver::Init: nets, parameters, device state

    def _init_nets(self) -> None:
        """Solver::InitTrainNet and InitTestNets, then the update rule (SGDSolver's ctor)."""
        sp, root = self.param, self.root
        train_param, train_src = _net_param(sp, root, "train")
        self.log(f"Creating training net from net file: {train_src}", "solver.cpp:102")
        self.train_net = build_fed_net(
            train_param, "TRAIN", root=root, seed=self.seed, stream=TRAIN_STREAM,
            n_devices=len(self.devices),
            state=sp.train_state if sp.HasField("train_state") else None,
            source_name=None if train_src.endswith("param") else str(root / train_src),
            part=(self.process, self.processes))
        self.opened.append(self.train_net)
        self.net = self.train_net.net
        self.tests: list[FedNet] = []
        self.n_tests = num_test_nets(sp)
        for k in range(self.n_tests if self.is_root else 0):
            tparam, tsrc = _net_param(sp, root, "test", k)
            self.log(f"Creating test net (#{k}) specified by {tsrc}", "solver.cpp:190")
            # Caffe tests on the root solver only, at the prototxt's batch size: test batches
            # are replicated, not split over the devices
            self.tests.append(build_fed_net(
                tparam, "TEST", root=root, seed=self.seed, stream=TEST_STREAM + k, n_devices=1,
                state=sp.test_state[k] if k < len(sp.test_state) else None))
            self.opened.append(self.tests[-1])
        refs = self.net.learnable_params
        self.rule = build_solver(sp, [r.lr_mult for r in refs], [r.decay_mult for r in refs])
        self.log("Solver scaffolding done.", "solver.cpp:57")

    def _init_params(self, weights: str | Sequence[str] | None) -> None:
        """Fillers from the seed, then caffe.cpp's CopyLayers for --weights (by layer name)."""
        self.params = self.net.init(jax.random.PRNGKey(self.seed))
        self.test_inits = [_test_init(t.net, self.params, self.seed) for t in self.tests]
        if weights:
            sources = _load_weights(weights, self.root)
            for w in (weights.split(",") if isinstance(weights, str) else weights):
                self.log(f"Finetuning from {w.strip()}", "caffe.cpp:124")
            self._copy_layers(sources)

    def _copy_layers(self, sources: list[dict[str, list[np.ndarray]]]) -> None:
        """Net::CopyTrainedLayersFrom into the train net and every test net."""
        def copy_log(m: str) -> None:
            self.log(m, "net.cpp:746")
        self.params = copy_layers(self.net, self.params, sources, log=copy_log)
        self.test_inits = [copy_layers(t.net, p, sources, log=copy_log)
                           for t, p in zip(self.tests, self.test_inits)]

    def _init_state(self) -> None:
        """Device placement (params replicated, batches split along N) and the jitted
        train step, train forward and test forwards."""
        mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec(None, "data"))  # (iter_size, N, ...)
        self.state = self._place_state(flatten_params(self.net, self.params), None, 0)
        self.step_fn = jax.jit(
            make_train_step(self.train_net, self.rule, self.params, precision=self.precision),
            out_shardings=(self.replicated, self.replicated), donate_argnums=(0,),
            compiler_options=TRAIN_STEP_COMPILER_OPTIONS)
        self.fwd_train = jax.jit(make_train_forward(self.train_net, self.params,
                                                    precision=self.precision),
                                 out_shardings=self.replicated)
        self.test_fns = [jax.jit(make_forward(t, ti, train=False, precision=self.precision))
                         for t, ti in zip(self.tests, self.test_inits)]
        # multi-process stop vote: one flag per device, any() of them, replicated
        self.per_device = NamedSharding(mesh, PartitionSpec("data"))
        self.any_fn = jax.jit(jnp.any, out_shardings=self.replicated)

    def _place_state(self, flat: tuple, history: Sequence[np.ndarray] | None,
                     iteration: int) -> TrainState:
        opt_state = self.rule.init(flat)
        if history is not None:
            opt_state = self.rule.with_history(opt_state, history)
        state = TrainState(flat, opt_state, jnp.asarray(iteration, jnp.int32),
                           jax.random.PRNGKey(self.seed))
        # from host values: every process passes the same ones to the replicated placement
        return jax.device_put(jax.tree.map(np.asarray, state), self.replicated)

    def _snapshot_prefix(self) -> Path:
        prefix = self.param.snapshot_prefix or ""
        if not prefix and (self.param.snapshot or self.param.snapshot_after_train):
            prefix = str(self.solver_path.with_suffix(""))  # Caffe: the solver file name
        self.prefix_str = prefix
        return Path(prefix) if Path(prefix).is_absolute() else self.root / prefix

    def close(self) -> None:
        # py-lmdb allows one open environment per path and process: close on every path out
        for f in self.opened:
            for src in f.sources.values():
                src.close()
        self.opened = []

    def __enter__(self) -> "Solver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request_stop(self, reason: str) -> None:
        """Snapshot after the current iteration, then stop (Caffe's SolverAction::STOP)."""
        self.requested_stop = reason

    # ---- Solver::Solve

    def solve(self) -> TrainResult:
        """Solver::Solve: Step up to max_iter (or stop_at_iter, snapshotting there), then the
        snapshot_after_train snapshot, one more TRAIN forward to print the final loss, a last
        TestAll and "Optimization Done."."""
        sp = self.param
        it0 = self.iter
        self.log("Starting Optimization", "caffe.cpp:239")
        self.log(f"Solving {self.net.name}", "solver.cpp:289")
        self.log(f"Learning Rate Policy: {sp.lr_policy}", "solver.cpp:290")
        self._solve_from = self._iters_last = self.iter
        self._t_loop = self._timer = time.time()
        stopped = self.step(self.stop_iter - self.iter)
        train_seconds = time.time() - self._t_loop
        if stopped:
            self.log("Optimization stopped early.", "solver.cpp:319")
        elif self.iter < self.max_iter:
            # stop_at_iter: leave a snapshot at that iteration for the next task to resume
            if self.last_snapshot is None or not self.last_snapshot[0].endswith(
                    f"_iter_{self.iter}.caffemodel"):
                self.snapshot()
        else:
            if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0):
                self.snapshot()
            if sp.display and self.iter % sp.display == 0:
                self._final_forward()
            if self._test_due(final=True):
                self.test_all()
            self.log("Optimization Done.", "solver.cpp:332")
        if self.metrics.records:
            self.metrics.plot()
        if self.processes > 1:
            # nobody returns before process 0 wrote the last snapshot (a caller may resume)
            multihost_utils.sync_global_devices("imagenet-pipeline Solver::Solve done")
        done = self.iter - it0
        return TrainResult(
            final_iter=self.iter, last_snapshot=self.last_snapshot,
            metrics_path=str(self.metrics.path), plot_path=str(self.metrics.plot_path),
            final_test_outputs=self.final_test, seconds=time.time() - self.t_start,
            images_per_second=(self.images / train_seconds) if done and train_seconds > 0
            else 0.0, losses=self.loss_log, stopped_by=self.requested_stop if stopped else None)

    def _final_forward(self) -> None:
        """Solve's extra TRAIN forward on the next batch after the last update, printed as
        "Iteration N, loss = L". No weight update follows, but being a TRAIN forward it updates
        BatchNorm's running statistics, which the test net shares: the final TestAll sees them
        (solver.cpp runs it after this forward), while the snapshot, written before, keeps the
        previous ones, so `caffe test` on that snapshot differs from the log's last test, as
        in Caffe (caffe-golden/resnet-mini README)."""
        batches = [{name: src.batch(self.position.train_batches)
                    for name, src in self.train_net.sources.items()}]
        arrays = self._put_train_batch(batches)
        rng = jax.random.fold_in(jax.random.fold_in(self.state.rng, self.iter), 0)
        loss, params = self.fwd_train(self.state.params, arrays, rng)
        self.state = self.state._replace(params=params)
        loss = np.float32(jax.device_get(local_copy(loss)))
        self._smooth(loss, self.iter)
        self.log(f"Iteration {self.iter}, loss = {fmt(self.position.smoothed)}",
                 "solver.cpp:327")

    def _test_due(self, final: bool = False) -> bool:
        sp = self.param
        return bool(sp.test_interval and self.iter % sp.test_interval == 0 and self.n_tests
                    and (final or self.iter > 0 or sp.test_initialization))

    # ---- Solver::Step

    def step(self, iters: int) -> bool:
        """Solver::Step: `iters` iterations of [TestAll when due], iter_size forward/backward
        passes, UpdateSmoothedLoss + display, ApplyUpdate, ++iter, [Snapshot when due or on a
        stop request]. Returns True when a stop request ended it early.

        Iteration i's loss is read back (`_finish`) after iteration i+1 was dispatched, so the
        host prepares batches while the device computes; nothing is tested or snapshotted
        before the losses of all iterations in it were checked."""
        sp = self.param
        stop_iter = self.iter + iters
        feeds = self._prefetchers(self.train_net, self.position.train_batches, self.prefetch)
        pending: _Pending | None = None
        try:
            with _StopRequest(self.request_stop):
                while self.iter < stop_iter:
                    if self._test_due():
                        self._finish(pending)
                        pending = None
                        self.test_all()
                        if self.requested_stop:  # Step: stop requested while testing
                            self.snapshot()
                            self.log(f"Received {self.requested_stop}: stopping after the "
                                     "snapshot", "solver.cpp:305")
                            return True
                    display = bool(sp.display) and self.iter % sp.display == 0
                    arrays = self._put_train_batch(self._next_passes(feeds))
                    before = self.current_step
                    hyper, self.current_step = self.rule.step_hyper(self.iter, self.current_step)
                    multistep = (f"MultiStep Status: Iteration {self.iter}, step = "
                                 f"{self.current_step}" if sp.lr_policy == "multistep"
                                 and self.current_step != before else "")
                    # the double rate stays on the host (logs); the step takes float32 values
                    self.state, m = self.step_fn(self.state, arrays,
                                                 {k: v for k, v in hyper.items() if k != "lr"})
                    vote = self._vote()
                    self._finish(pending)
                    pending = _Pending(self.iter, m, hyper, display, multistep, vote)
                    self.iter += 1
                    if self.on_progress is not None:
                        self.on_progress(self.iter, self.max_iter)
                    stop = self.requested_stop if self.processes == 1 else self.agreed_stop
                    if (sp.snapshot and self.iter % sp.snapshot == 0) or stop:
                        self._finish(pending)  # never snapshot weights whose loss is unchecked
                        pending = None
                        self.snapshot()
                        self.metrics.plot()
                    if stop:
                        self.log(f"Received {stop}: stopping after the snapshot",
                                 "solver.cpp:305")
                        return True
                self._finish(pending)
        finally:
            for p in feeds.values():
                p.close()
        return False

    def _vote(self) -> Any:
        """With several processes, whether any has a stop request: a tiny collective
        dispatched after each step and read with that step's loss, so every process stops
        after the same iteration (one later than a single process would). None with one."""
        if self.processes == 1:
            return None
        n_local = len(self.devices) // self.processes
        flags = np.full(n_local, self.requested_stop is not None)
        return self.any_fn(jax.make_array_from_process_local_data(
            self.per_device, flags, (len(self.devices),)))

    def _next_passes(self, feeds: Mapping[str, Prefetcher]) -> list[dict[str, HostBatch]]:
        """The host batches of one iteration: iter_size passes of every Data layer."""
        passes = [{name: next(p) for name, p in feeds.items()}
                  for _ in range(int(self.param.iter_size))]
        if any(b.wrapped for p in passes for b in p.values()):
            self.log("Restarting data prefetching from start.", "data_layer.cpp:73")
        self.position.train_batches += len(passes)
        return passes

    def _put_train_batch(self, passes: Sequence[Mapping[str, HostBatch]]) -> dict[str, Any]:
        """This process's share of the batch (its rows on axis 1) into the global array."""
        def put(local: np.ndarray) -> jax.Array:
            shape = (local.shape[0], local.shape[1] * self.processes, *local.shape[2:])
            return jax.make_array_from_process_local_data(self.sharded, local, shape)
        return jax.tree.map(put, stack_batches(self.train_net, passes))

    def _finish(self, p: _Pending | None) -> None:
        """The display half of Step for iteration p.it: NaN check, UpdateSmoothedLoss,
        "Iteration N (x iter/s, ...), loss = L", the train outputs, ApplyUpdate's lr line."""
        if p is None:
            return
        sp, i = self.param, p.it
        loss = np.float32(jax.device_get(local_copy(p.metrics["loss"])))
        if not np.isfinite(loss):
            where = (f"; the last good snapshot is {self.last_snapshot[1]}"
                     if self.last_snapshot else "")
            raise ImagenetError(f"loss is {loss} at iteration {i} (lr {fmt(p.hyper['lr'])}): "
                                f"training diverged, stopping{where}")
        if p.vote is not None and bool(jax.device_get(local_copy(p.vote))):
            self.agreed_stop = self.requested_stop or "a stop request from another process"
        if i == self._solve_from:  # the first step includes compilation: time from its end
            self._t_loop = time.time()
        else:
            self.images += int(sp.iter_size) * fed_batch_size(self.train_net)
        self._smooth(loss, i)
        rows: list[tuple[str, float, float]] = []
        if p.display:
            lapse = time.time() - self._timer
            per_s = (i - self._iters_last) / (lapse if lapse else 1)
            self.log(f"Iteration {i} ({fmt(per_s)} iter/s, {fmt(lapse)}s/{sp.display} "
                     f"iters), loss = {fmt(self.position.smoothed)}", "solver.cpp:239")
            rows = _output_lines(jax.device_get(local_copy(p.metrics["outputs"])),
                                 self.train_net.loss_weight)
            for j, (name, v, w) in enumerate(rows):
                self.log(_out_msg("Train", j, name, v, w), "solver.cpp:258")
        if p.multistep:  # printed by GetLearningRate, inside ApplyUpdate
            self.log(p.multistep, "sgd_solver.cpp:53")
        if p.display:
            self.log(f"Iteration {i}, lr = {fmt(p.hyper['lr'])}", "sgd_solver.cpp:112")
            self.metrics.add({"kind": "train", "iter": i, "loss": float(self.position.smoothed),
                              "lr": float(p.hyper["lr"]),
                              "outputs": {n: v for n, v, _ in rows}})
            self._timer, self._iters_last = time.time(), i

    def _smooth(self, loss: np.float32, it: int) -> None:
        """Solver::UpdateSmoothedLoss, and the per-iteration loss record."""
        pos = self.position
        self.loss_log[it] = float(loss)
        pos.smoothed = update_smoothed_loss(pos.losses, pos.smoothed, loss,
                                            it - pos.start_iter, int(self.param.average_loss))

    def _prefetchers(self, f: FedNet, start: int, count: int) -> dict[str, Prefetcher]:
        return {name: Prefetcher(src, start, depth=max(1, min(self.prefetch, count)))
                for name, src in f.sources.items()}

    # ---- Solver::TestAll / Test

    def test_all(self) -> dict[str, float]:
        """Solver::TestAll: every test net in turn. Returns (and passes to on_test) one dict per
        test point: net 0's outputs by name, further nets' as "net<k>/name"."""
        merged: dict[str, float] = {}
        for k in range(len(self.tests)):
            result = self.test(k)
            if result is None:  # interrupted by a stop request: no outputs to report
                return merged
            merged.update(result if k == 0 else {f"net{k}/{n}": v for n, v in result.items()})
        self.final_test = merged
        if self.on_test is not None and self.tests:
            self.on_test(self.iter, dict(merged))
        if self.tests:
            self.metrics.plot()
        return merged

    def test(self, k: int) -> dict[str, float] | None:
        """Solver::Test: test net k's outputs averaged over test_iter[k] batches, its loss
        ("Test loss") when test_compute_loss, each printed as Caffe does. A stop request
        between two batches interrupts it ("Test interrupted.", None), as in Caffe."""
        t, n_iter = self.tests[k], int(self.param.test_iter[k])
        self.log(f"Iteration {self.iter}, Testing net (#{k})", "solver.cpp:347")
        params = self._test_params(k)
        scores: dict[str, np.ndarray] = {}
        loss_sum = np.float32(0)
        feeds = self._prefetchers(t, self.position.test_batches[k], n_iter)
        try:
            for i in range(n_iter):
                if self.requested_stop:
                    self.log("Test interrupted.", "solver.cpp:395")
                    return None
                batch = {name: next(p) for name, p in feeds.items()}
                arrays = jax.device_put(stack_batches(t, [batch]), params[0].device)
                loss, outs = self.test_fns[k](params, arrays, None)
                loss_sum += np.float32(loss)
                for name, v in jax.device_get(outs).items():
                    v = np.asarray(v, np.float32).ravel()
                    scores[name] = v if name not in scores else scores[name] + v
                if self.on_test_batch is not None:
                    self.on_test_batch(self.iter, i + 1, n_iter)
        finally:
            for p in feeds.values():
                p.close()
        self.position.test_batches[k] += n_iter
        if self.param.test_compute_loss:
            self.log(f"Test loss: {fmt(loss_sum / np.float32(n_iter))}", "solver.cpp:399")
        result: dict[str, float] = {}
        j = 0
        for name, total in scores.items():
            for e, v in enumerate(total):
                mean = np.float32(v) / np.float32(n_iter)
                self.log(_out_msg("Test", j, name, float(mean), t.loss_weight.get(name, 0.0)),
                         "solver.cpp:414")
                result[name if total.size == 1 else f"{name}[{e}]"] = float(mean)
                j += 1
        self.metrics.add({"kind": "test", "iter": self.iter, "net": k, "outputs": result})
        return result

    def _test_params(self, k: int) -> tuple:
        """Net::ShareTrainedLayersWith: a test-net blob is the train blob of the same layer
        name; test-only layers keep their own values. On this process's first device: the
        test nets run there alone (Caffe tests on the root solver)."""
        local = local_copy(self.state.params)
        device = local[0].device
        train_vals = unflatten_params(self.net, local, self.params)
        out = []
        for r in self.tests[k].net.learnable_params:
            if r.layer in train_vals and train_vals[r.layer][r.index] is not None:
                out.append(train_vals[r.layer][r.index])
            else:
                out.append(jax.device_put(np.asarray(self.test_inits[k][r.layer][r.index]),
                                          device))
        return tuple(out)

    # ---- Solver::Snapshot / Restore

    def snapshot(self) -> None:
        """Solver::Snapshot: the TRAIN net as .caffemodel, SGDSolver's .solverstate (history,
        current_step), and our side file with what exact resume needs (model/snapshot.py).
        Process 0 alone writes; the others hold the same replicated state."""
        if not self.is_root:
            return
        host_params = unflatten_params(self.net, jax.device_get(local_copy(self.state.params)),
                                       self.params)
        model_bytes = net_to_proto(self.net, host_params).SerializeToString()
        history = [np.asarray(h) for h in
                   jax.device_get(local_copy(self.rule.history(self.state.opt_state)))]
        files = snap.write_snapshot(prefix=self.prefix_str, iteration=self.iter, root=self.root,
                                    caffemodel=model_bytes, history=history,
                                    current_step=self.current_step, side=self._side_record(),
                                    log=lambda m: self.log(m, "solver.cpp:464"))
        self.last_snapshot = (str(files.caffemodel), str(files.solverstate))

    def _side_record(self) -> dict[str, Any]:
        pos = self.position
        return {"seed": self.seed, "devices": len(self.devices),
                "train_batches": pos.train_batches, "test_batches": list(pos.test_batches),
                "losses": [float(x) for x in pos.losses], "smoothed_loss": float(pos.smoothed),
                "start_iter": pos.start_iter, "iter_size": int(self.param.iter_size),
                # absent: one process (side files of single-process runs stay as they were)
                **({"processes": self.processes} if self.processes > 1 else {})}

    def restore(self, point: ResumePoint) -> None:
        """Solver::Restore + SGDSolver::RestoreSolverStateFromBinaryProto: the learned_net's
        weights, the history blobs, iter and current_step; from our side file also the data
        position and the smoothing window (Caffe restarts its readers: BVLC/caffe#1059)."""
        self.log(f"Resuming from {point.given}", "caffe.cpp:235")
        self._copy_layers([load_caffemodel(point.caffemodel)])
        self.iter, self.current_step = point.state.iter, point.state.current_step
        self.log("SGDSolver: restoring history", "sgd_solver.cpp:336")
        self.state = self._place_state(flatten_params(self.net, self.params),
                                       point.state.history, self.iter)
        side = point.side
        caveat = snap.side_format_caveat(side) if side is not None else None
        if caveat:
            self.log(f"Resume is not exact: {point.given}'s resume file was {caveat}; weights, "
                     "history, data position and the loss window are restored", "solver.cpp:0")
        if side is None:
            self.position = DataPosition(test_batches=[0] * self.n_tests,
                                         start_iter=self.iter)
        else:
            self.position = DataPosition(
                train_batches=int(side["train_batches"]),
                test_batches=[int(c) for c in side["test_batches"]],
                losses=[float(x) for x in side["losses"]],
                smoothed=np.float32(side["smoothed_loss"]), start_iter=int(side["start_iter"]))


def _test_init(tnet: Net, train_params: Params, seed: int) -> Params:
    """Initial test-net params: the train net's blobs where layer names match (they are shared
    anyway), fillers only when the test net has layers of its own."""
    own = [r for r in tnet.learnable_params if r.layer not in train_params]
    base = tnet.init(jax.random.PRNGKey(seed)) if own else {}
    out: Params = {}
    for layer in tnet.layers:
        if layer.blobs:
            out[layer.name] = list(base[layer.name]) if layer.name in base else [
                train_params.get(layer.name, [None] * len(layer.blobs))[i]
                for i in range(len(layer.blobs))]
    return out


def fed_batch_size(fed: FedNet) -> int:
    return max((s.batch_size for s in fed.sources.values()), default=0)


# ----------------------------------------------------------------------------- evaluate()

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
    params = copy_layers(fed.net, params, _load_weights(weights, root),
                         log=lambda m: clog(m, "net.cpp:746"))
    mesh = Mesh(np.array(devs), ("data",))
    # `caffe test` runs one device at the prototxt's batch size; several devices just hold
    # replicas
    replicated = NamedSharding(mesh, PartitionSpec())
    flat = jax.device_put(flatten_params(fed.net, params), replicated)
    fwd = jax.jit(make_forward(fed, params, train=False))
    clog(f"Running for {iterations} iterations.", "caffe.cpp:281")
    scores: dict[str, np.ndarray] = {}
    loss_sum = np.float32(0)
    pfs = {name: Prefetcher(src, 0, depth=min(3, iterations)) for name, src in fed.sources.items()}
    try:
        for i in range(iterations):
            hb = {name: next(p) for name, p in pfs.items()}
            loss, outs = fwd(flat, jax.device_put(stack_batches(fed, [hb]), replicated), None)
            loss_sum += np.float32(loss)
            j = 0
            for name, v in jax.device_get(outs).items():
                v = np.asarray(v, np.float32).ravel()
                for x in v:
                    clog(f"Batch {i}, {name} = {fmt(x)}", "caffe.cpp:304")
                    j += 1
                scores[name] = v if name not in scores else scores[name] + v
            if on_batch is not None:
                on_batch(i + 1, iterations)
    finally:
        for p in pfs.values():
            p.close()
        for s in fed.sources.values():
            s.close()
    clog(f"Loss: {fmt(loss_sum / np.float32(iterations))}", "caffe.cpp:309")
    result: dict[str, float] = {}
    for name, total in scores.items():
        for j, v in enumerate(total):
            mean = float(np.float32(v) / np.float32(iterations))
            key = name if total.size == 1 else f"{name}[{j}]"
            w = fed.loss_weight.get(name, 0.0)
            msg = f"{key} = {fmt(mean)}"
            if w:
                msg += f" (* {fmt(w)} = {fmt(np.float32(w) * np.float32(mean))} loss)"
            clog(msg, "caffe.cpp:322")
            result[key] = mean
    return result
