"""Caffe's Solver (src/caffe/solver.cpp) around the jitted train step: Init, Solve, Step, Test,
Snapshot and Restore, one method per Caffe function and in Caffe's order.

Step: test at iter % test_interval == 0 (iteration 0 only with test_initialization),
forward/backward iter_size times, smoothed loss over average_loss, display "Iteration N (x
iter/s, ys/D iters), loss = L" + net outputs, ApplyUpdate with "Iteration N, lr = R", ++iter,
snapshot every `snapshot` iterations. Solve: after max_iter a snapshot (snapshot_after_train),
one more TRAIN forward printed as "Iteration N, loss = L" (which, as a TRAIN forward, updates
BatchNorm's running statistics after the snapshot), the final test and "Optimization Done.".

Data parallelism, as Caffe's multi-GPU P2PSync: the global batch is batch_size x devices, split
along N over a one-axis mesh; params and optimizer state are replicated and XLA all-reduces the
gradients. The devices may belong to several processes (hosts) joined by model/distributed.py:
each process then reads only its share of every global batch (data/pipeline.py read_part), in
the order one process would read it, and process 0 alone logs, tests and snapshots; a stop
request on any process stops all of them at the same iteration (model/stop.py).

The pieces live beside it: the step functions in model/steps.py, the nets and their data in
model/feed.py, devices in model/devices.py, resume points and the data position in
model/resume.py, logs, metrics and the plot in model/metrics.py.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.errors import ImagenetError
from data.pipeline import DEFAULT_PREFETCH, default_workers
from model import snapshot as snap
from model.caffemodel import check_coverage, copy_layers, load_caffemodel, net_to_proto
from model.devices import local_copy, select_devices
from model.feed import (TEST_STREAM, TRAIN_STREAM, DeviceFeed, FedNet, build_fed_net,
                        fed_batch_size, net_param, num_test_nets, stack_batches)
from model.metrics import (CaffeLog, LogFn, MetricsWriter, OutputSums, discard, fmt, out_msg,
                           output_lines)
from model.net import Net, Params
from model.resume import (DataPosition, ResumePoint, choose_seed, load_weights,
                          read_resume_point, weights_paths)
from model.solver import build_solver, check_solver, read_solver, solver_type
from model.steps import (TrainState, flatten_params, jit_for, jit_train_step, make_forward,
                         make_train_forward, place_state, unflatten_params)
from model.stop import StopRequest, StopVote


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
    train_seconds: float = 0.0       # from the first step's end to the last's (the img/s)
    input_wait_seconds: float = 0.0  # of train_seconds, the steps' wait for their inputs


@dataclass
class _Pending:
    """An iteration dispatched to the device whose loss the host has not read yet."""

    it: int
    metrics: Any
    hyper: dict[str, Any]
    display: bool
    multistep: str
    vote: Any = None  # multi-process: whether any process asked to stop (a device array)


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
    request on any process stops all of them at the same iteration (model/stop.py).
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
                 prefetch: int = DEFAULT_PREFETCH, workers: int | None = None) -> None:
        self.t_start = time.time()
        self.processes, self.process = jax.process_count(), jax.process_index()
        self.is_root = self.process == 0
        self.log = CaffeLog(log if self.is_root else discard)
        self.root = Path(workdir) if workdir is not None else Path.cwd()
        path = Path(solver_path)
        self.solver_path = path if path.is_absolute() or path.exists() else self.root / path
        if snapshot is not None and weights:
            raise ImagenetError("Give a snapshot to resume training or weights to finetune but "
                                "not both.")
        self.param = sp = read_solver(str(self.solver_path))
        check_solver(sp, solver_type(sp), str(self.solver_path))  # before any net is built
        snap.check_snapshot_folder(self._snapshot_prefix(), self.prefix_str)
        self.devices = select_devices(devices, int(sp.solver_mode), int(sp.device_id))
        self.log("Use CPU." if self.devices[0].platform == "cpu"
                 else f"Using devices {self.devices}", "caffe.cpp:197")
        resume = (read_resume_point(snapshot, self.root, len(self.devices), self.processes)
                  if snapshot is not None else None)
        self.seed = choose_seed(sp, resume)
        self.precision, self.prefetch = precision, prefetch
        if workers is not None and workers < 1:
            raise ImagenetError(f"workers must be >= 1, got {workers}")
        self.workers = workers  # None: one per core (data/pipeline.py default_workers)
        self.input_wait = 0.0   # seconds the steps waited for their inputs
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
        train_param, train_src = net_param(sp, root, "train")
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
            tparam, tsrc = net_param(sp, root, "test", k)
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
            sources = load_weights(weights, self.root)
            for w in (weights.split(",") if isinstance(weights, str) else weights):
                self.log(f"Finetuning from {w.strip()}", "caffe.cpp:124")
            self._copy_layers(sources)
            # Caffe would train from scratch without a word on an empty or cut-short file
            fresh = check_coverage(self.net, sources, weights_paths(weights, self.root),
                                   whole_net=False)
            if fresh:
                self.log(f"Not in the weights, initialised by their fillers: "
                         f"{', '.join(fresh)}", "net.cpp:746")

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
        self.step_fn = jit_train_step(self.train_net, self.rule, self.params,
                                      replicated=self.replicated, precision=self.precision)
        self.fwd_train = jit_for(make_train_forward(self.train_net, self.params,
                                                    precision=self.precision),
                                 self.devices, out_shardings=self.replicated)
        self.test_fns = [jit_for(make_forward(t, ti, train=False, precision=self.precision),
                                 self.devices) for t, ti in zip(self.tests, self.test_inits)]
        self.vote = StopVote(self.devices, self.processes) if self.processes > 1 else None

    def _place_state(self, flat: tuple, history: Sequence[np.ndarray] | None,
                     iteration: int) -> TrainState:
        return place_state(self.rule, flat, history, iteration, self.seed, self.replicated)

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
            else 0.0, losses=self.loss_log, stopped_by=self.requested_stop if stopped else None,
            train_seconds=train_seconds if done else 0.0, input_wait_seconds=self.input_wait)

    def _final_forward(self) -> None:
        """Solve's extra TRAIN forward on the next batch after the last update, printed as
        "Iteration N, loss = L". No weight update follows, but being a TRAIN forward it updates
        BatchNorm's running statistics, which the test net shares: the final TestAll sees them
        (solver.cpp runs it after this forward), while the snapshot, written before, keeps the
        previous ones, so `caffe test` on that snapshot differs from the log's last test, as
        in Caffe (caffe-golden/resnet-mini README)."""
        batches = [{name: src.batch(self.position.train_batches)
                    for name, src in self.train_net.sources.items()}]
        arrays = self._put_train_batch(stack_batches(self.train_net, batches))
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
        feed = self._feed(self.train_net, self.position.train_batches, int(sp.iter_size),
                          self._put_train_batch)
        pending: _Pending | None = None
        try:
            with StopRequest(self.request_stop):
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
                    arrays = self._next_arrays(feed)
                    before = self.current_step
                    hyper, self.current_step = self.rule.step_hyper(self.iter, self.current_step)
                    multistep = (f"MultiStep Status: Iteration {self.iter}, step = "
                                 f"{self.current_step}" if sp.lr_policy == "multistep"
                                 and self.current_step != before else "")
                    # the double rate stays on the host (logs); the step takes float32 values
                    self.state, m = self.step_fn(self.state, arrays,
                                                 {k: v for k, v in hyper.items() if k != "lr"})
                    # every process stops after the same iteration (model/stop.py)
                    vote = (self.vote(self.requested_stop is not None)
                            if self.vote is not None else None)
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
            feed.close()
        return False

    def _next_arrays(self, feed: DeviceFeed) -> dict[str, Any]:
        """One iteration's inputs (iter_size passes of every Data layer), already on the
        devices; the data position counts what the steps consumed, not what was read ahead."""
        arrays, wrapped, waited = feed.next()
        if wrapped:
            self.log("Restarting data prefetching from start.", "data_layer.cpp:73")
        self.position.train_batches += int(self.param.iter_size)
        if self.iter != self._solve_from:  # like the img/s: from the first step's end
            self.input_wait += waited
        return arrays

    def _put_train_batch(self, stacked: Mapping[str, Any]) -> dict[str, Any]:
        """This process's share of the batch (its rows on axis 1) into the global array (on
        DeviceFeed's thread, while the previous step runs)."""
        def put(local: np.ndarray) -> jax.Array:
            shape = (local.shape[0], local.shape[1] * self.processes, *local.shape[2:])
            return jax.make_array_from_process_local_data(self.sharded, local, shape)
        return jax.tree.map(put, stacked)

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
            rows = output_lines(jax.device_get(local_copy(p.metrics["outputs"])),
                                 self.train_net.loss_weight)
            for j, (name, v, w) in enumerate(rows):
                self.log(out_msg("Train", j, name, v, w), "solver.cpp:258")
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

    def _feed(self, f: FedNet, start: int, passes: int, put: Callable[[Any], Any]
              ) -> DeviceFeed:
        """Inputs built on `workers` threads, enough batches ahead to keep them all busy."""
        return DeviceFeed(f, start, passes, put, workers=self.workers,
                          prefetch=max(self.prefetch, passes * (self.workers or
                                                               default_workers())))

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
        sums = OutputSums()
        device = params[0].device
        feed = self._feed(t, self.position.test_batches[k], 1,
                          lambda stacked: jax.device_put(stacked, device))
        try:
            for i in range(n_iter):
                if self.requested_stop:
                    self.log("Test interrupted.", "solver.cpp:395")
                    return None
                arrays, _, _ = feed.next()
                loss, outs = self.test_fns[k](params, arrays, None)
                sums.add(loss, jax.device_get(outs))
                if self.on_test_batch is not None:
                    self.on_test_batch(self.iter, i + 1, n_iter)
        finally:
            feed.close()
        self.position.test_batches[k] += n_iter
        if self.param.test_compute_loss:
            self.log(f"Test loss: {fmt(sums.loss / np.float32(n_iter))}", "solver.cpp:399")
        result: dict[str, float] = {}
        for j, (name, key, mean) in enumerate(sums.means(n_iter)):
            self.log(out_msg("Test", j, name, float(mean), t.loss_weight.get(name, 0.0)),
                     "solver.cpp:414")
            result[key] = float(mean)
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
                                    current_step=self.current_step,
                                    side=self.position.side_record(
                                        seed=self.seed, devices=len(self.devices),
                                        iter_size=int(self.param.iter_size),
                                        processes=self.processes),
                                    log=lambda m: self.log(m, "solver.cpp:464"))
        self.last_snapshot = (str(files.caffemodel), str(files.solverstate))

    def restore(self, point: ResumePoint) -> None:
        """Solver::Restore + SGDSolver::RestoreSolverStateFromBinaryProto: the learned_net's
        weights, the history blobs, iter and current_step; from our side file also the data
        position and the smoothing window (Caffe restarts its readers: BVLC/caffe#1059)."""
        self.log(f"Resuming from {point.given}", "caffe.cpp:235")
        learned = load_caffemodel(point.caffemodel)
        self._copy_layers([learned])
        check_coverage(self.net, [learned], [point.caffemodel], whole_net=True)
        self.iter, self.current_step = point.state.iter, point.state.current_step
        self.log("SGDSolver: restoring history", "sgd_solver.cpp:336")
        try:
            self.state = self._place_state(flatten_params(self.net, self.params),
                                           point.state.history, self.iter)
        except ImagenetError as err:
            raise ImagenetError(f"{point.solverstate}: {err} (cut short, or the snapshot of "
                                "another net?)") from None
        side = point.side
        caveat = snap.side_format_caveat(side) if side is not None else None
        if caveat:
            self.log(f"Resume is not exact: {point.given}'s resume file was {caveat}; weights, "
                     "history, data position and the loss window are restored", "solver.cpp:0")
        self.position = DataPosition.from_side(side, self.n_tests, self.iter)
