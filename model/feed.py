"""The nets a Solver trains and tests, fed from their Data / ImageData layers' sources.

Solver::InitTrainNet / InitTestNets pick each net's NetParameter (`net_param`,
`num_test_nets`); `build_fed_net` filters it for its phase, opens a data/pipeline.py source per
data layer (global batch = batch_size x devices, as Caffe's multi-GPU; with several processes
each reads its part of every global batch) and builds the Net with shapes taken from the
first batch. `stack_batches` turns one step's host batches into the step's input arrays;
`DeviceFeed` does that on a background thread and puts them on the devices ahead of the step.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data.errors import ImagenetError
from data.pipeline import SOURCE_TYPES, BatchSource, HostBatch, Prefetcher, open_source
from data.proto import caffe_pb2
from model.net import Net

# Streams of the counter-based data RNG: the train net, then test net k at TEST_STREAM + k.
TRAIN_STREAM = 0
TEST_STREAM = 1
# Steps whose inputs wait on the device (DeviceFeed): 2 = double buffering.
DEVICE_DEPTH = 2
# Seconds between checks for a stop request while the input thread or its consumer waits.
POLL_S = 0.1


@dataclass
class FedNet:
    """A net whose Data / ImageData layers are fed from their sources (data/pipeline.py)."""

    net: Net
    sources: dict[str, BatchSource]  # input layer name -> source
    means: dict[str, np.ndarray | None]
    loss_weight: dict[str, float]   # output blob -> loss weight


def net_param(solver: caffe_pb2.SolverParameter, root: Path, which: str, k: int = 0
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


def fed_batch_size(fed: FedNet) -> int:
    return max((s.batch_size for s in fed.sources.values()), default=0)


class DeviceFeed:
    """The inputs of consecutive steps of one net, on the device ahead of the step that needs
    them: a background thread takes `passes` host batches per step from each source's
    Prefetcher (`workers` threads decoding, `prefetch` batches ahead), stacks them
    (`stack_batches`) and hands them to `put` (device_put / make_array_from_process_local_data);
    `depth` steps' arrays wait on the device (2: double buffering, step i+1's batch is
    transferred while step i runs). Nothing here changes which batch a step gets: step k reads
    batches start + k*passes .. as before, whatever the worker count.

    `next()` returns (arrays, wrapped, waited): whether a batch passed the end of its
    database, and the seconds the caller waited for it (input-bound time). An error building a
    batch (a bad label, an unreadable record) is raised by the `next()` of that step."""

    def __init__(self, fed: FedNet, start: int, passes: int, put: Callable[[Any], Any], *,
                 prefetch: int, workers: int | None, depth: int = DEVICE_DEPTH) -> None:
        self.fed, self.passes, self.put = fed, passes, put
        self.prefetchers = {name: Prefetcher(src, start, depth=max(1, prefetch),
                                             workers=workers)
                            for name, src in fed.sources.items()}
        self._queue: queue.Queue[tuple[Any, bool] | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                passes = [{name: next(p) for name, p in self.prefetchers.items()}
                          for _ in range(self.passes)]
                wrapped = any(b.wrapped for p in passes for b in p.values())
                item: tuple[Any, bool] | BaseException = (
                    self.put(stack_batches(self.fed, passes)), wrapped)
                self._offer(item)
        except BaseException as err:  # handed to the step that needed this batch
            self._offer(err)

    def _offer(self, item: tuple[Any, bool] | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[Any, bool, float]:
        t0 = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise ImagenetError("the input thread stopped without a batch") from None
        waited = time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        arrays, wrapped = item
        return arrays, wrapped, waited

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for p in self.prefetchers.values():
            p.close()
