"""Training throughput of bvlc_alexnet: this project's trainer against PyTorch, same run.

Usage: python benchmarks/train.py --device cpu --batch-size 32
       [--precision float32|bf16] [--iterations 8] [--warmup 2] [--workers N]
       [--allocator auto|jemalloc|system] [--conv-plans auto|remeasure|cached|heuristic]
       [--no-torch] [--records N] [--json out.json]

Ours is the real thing: model/zoo/bvlc_alexnet/train_val.prototxt and solver.prototxt, the
Net, the Caffe SGD solver (model/solver.py), model/steps.py's `jit_train_step` with donated
state, data-parallel shardings over all local devices of --device and the kernels and XLA
options of that platform (model/backend.py), fed as the trainer feeds it (model/feed.py
DeviceFeed: data/pipeline.py's Prefetcher on --workers threads, each batch stacked and put on
the devices on a background thread, two steps ahead) from a real LMDB of random 256x256 images
built in a temp dir (crop 227 + mirror + mean file: the uint8 crop on the host, the float work
in the step). Ours also reports the share of its step time spent waiting for input (the
trainer's target: below 2%).
PyTorch (benchmarks/torch_alexnet.py, when importable) trains the same net from the same
prefetched uint8 batches in the same process, after ours.

Reported per framework: img/s over the timed iterations, median ms/iter (min-max), model
FLOP/s from 4.35 GFLOP per image (forward + backward), MFU against the device's float32 (or
bf16) matmul rate measured in this run, and compile / first-step time separately. The LAST
line is `train img/s: ours X, pytorch Y, ratio Z` (Z = X/Y; `pytorch n/a` without torch).

The header names the CPU (model, family, ISA flags, cores), the load average and the versions.
Convolution plans come from model/autotune.py (--conv-plans, default auto: measured once per
machine and cached; the time spent measuring is printed on its own, never as compile time).

With --allocator auto (default) the process re-executes itself under jemalloc when Debian's
libjemalloc2 is installed: both frameworks then run with it (benchmarks/common.py says why).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

PRECISIONS = {"float32": "fp32", "bf16": "bf16"}  # CLI name -> model/train.py name
DEVICES = ("cpu", "gpu")
# Records in the benchmark LMDB, in batches: enough that no batch repeats within a short run
# on a GPU, small enough to build in seconds on the CPU (196 KB per record).
RECORD_BATCHES = 4
PREFETCH_DEPTH = 3


@dataclass
class Result:
    name: str
    img_per_s: float = 0.0
    ms_median: float = 0.0
    ms_range: str = ""
    tflops: float = 0.0
    mfu: float = 0.0
    compile_s: float = 0.0
    first_step_s: float = 0.0
    config: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.name:8} {self.img_per_s:9.2f} img/s  {self.ms_median:9.1f} ms/iter "
                f"({self.ms_range})  {self.tflops * 1e3:8.1f} GFLOP/s  MFU {self.mfu * 100:5.1f}%  "
                f"compile {self.compile_s:.1f} s, first step {self.first_step_s:.1f} s  "
                f"[{self.config}]")


def _finish(res: Result, timing: common.Timing, peak_flops: float) -> Result:
    res.img_per_s = timing.img_per_s
    res.ms_median = timing.median * 1e3
    res.ms_range = timing.range_ms()
    res.tflops = res.img_per_s * common.ALEXNET_TRAIN_GFLOP_PER_IMAGE * 1e9 / 1e12
    res.mfu = res.tflops * 1e12 / peak_flops if peak_flops else 0.0
    return res


def jax_devices(kind: str) -> list[Any]:
    import jax

    try:
        devs = jax.devices(kind)
    except RuntimeError as err:
        raise SystemExit(f"--device {kind}: JAX has no {kind} backend here ({err})") from None
    return list(devs)


def matmul_peak(devices: list[Any], precision: str) -> float:
    """FLOP/s of a large square matmul on one device, times the device count: the roofline
    MFU is quoted against. bf16 as model/kernels.py multiplies it (bf16 operands, float32
    sums: XLA:CPU upcasts a plain bf16 x bf16 -> bf16 dot to float32 first)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dev = devices[0]
    n = 2048 if dev.platform == "cpu" else 8192
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x: lax.dot_general(x, x, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best * len(devices)


@dataclass
class Contender:
    """A framework ready to train: `step()` runs one iteration (next batch included) and
    returns its loss, synchronised with the host; compile and first step already done."""

    result: Result
    step: Callable[[], float]
    close: Callable[[], None]
    losses: list[float] = field(default_factory=list)
    waits: list[float] | None = None  # per step, seconds waiting for the input (ours)


def setup_ours(data: common.BenchData, args: argparse.Namespace, devices: list[Any]) -> Contender:
    """The project's trainer: the same objects model.train.train() builds."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from data.pipeline import default_workers
    from model import autotune
    from model import train as T
    from model.feed import DeviceFeed
    from model.solver import build_solver

    n_dev = len(devices)
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"{args.device} devices ({n_dev})")
    net_param = common.alexnet_train_net(data, args.batch_size // n_dev)
    fed = T.build_fed_net(net_param, "TRAIN", root=common.REPO, seed=0, stream=T.TRAIN_STREAM,
                          n_devices=n_dev)
    net = fed.net
    sp = common.alexnet_solver()
    solver = build_solver(sp, [r.lr_mult for r in net.learnable_params],
                          [r.decay_mult for r in net.learnable_params])
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(None, "data"))
    params = net.init(jax.random.PRNGKey(0))  # fillers sample with numpy on the host
    flat = T.flatten_params(net, params)
    state = T.TrainState(flat, solver.init(flat), jnp.asarray(0, jnp.int32),
                         jax.random.PRNGKey(0))
    state = jax.device_put(state, replicated)
    step_fn = T.jit_train_step(fed, solver, params, replicated=replicated,
                               precision=PRECISIONS[args.precision])
    (src,) = fed.sources.values()
    res = Result("ours", config=f"jax {jax.__version__}, {n_dev} x {devices[0].device_kind}, "
                                f"{args.precision}")
    arrays = jax.device_put(T.stack_batches(fed, [{src.name: src.batch(0)}]), sharded)
    hyper, _ = solver.step_hyper(0, 0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, arrays, hyper).compile()
    # Convolution plans measured while tracing (once per machine) are not compile time.
    tuned = autotune.measured()
    tuning_s = sum(m.seconds for _, m in tuned)
    res.compile_s = time.perf_counter() - t0 - tuning_s
    res.config += f", conv plans {autotune.mode()}"
    if tuned:
        res.config += f" (measured {len(tuned)} shapes in {tuning_s:.0f} s)"
    workers = args.workers or default_workers()
    feed = DeviceFeed(fed, 0, 1, lambda stacked: jax.device_put(stacked, sharded),
                      prefetch=max(PREFETCH_DEPTH, workers), workers=workers)
    res.config += f", {workers} input workers"
    it, current_step = 0, 0
    waits: list[float] = []

    def one_step() -> float:
        nonlocal state, it, current_step
        arrays, _, waited = feed.next()
        waits.append(waited)
        hyper, current_step = solver.step_hyper(it, current_step)
        state, m = compiled(state, arrays, hyper)
        it += 1
        return float(jax.device_get(m["loss"]))  # the trainer reads the loss every step

    def close() -> None:
        feed.close()
        src.close()

    t0 = time.perf_counter()
    first = one_step()
    res.first_step_s = time.perf_counter() - t0
    return Contender(res, one_step, close, [first], waits)


def setup_torch(data: common.BenchData, args: argparse.Namespace) -> Contender:
    import torch_alexnet

    from data.pipeline import DataSource, Prefetcher
    from model.prototxt import filter_net

    net_param = filter_net(common.alexnet_train_net(data, args.batch_size), "TRAIN")
    (lp,) = [lp for lp in net_param.layer if lp.type == "Data"]
    src = DataSource(lp, train=True, seed=0, root=common.REPO)
    mean = src.mean(3)
    off = (mean.shape[1] - torch_alexnet.CROP) // 2
    mean = mean[:, off:off + torch_alexnet.CROP, off:off + torch_alexnet.CROP]
    step, cfg = torch_alexnet.make_trainer(
        mean=mean, device=args.device, precision=args.precision,
        threads=os.cpu_count() if args.device == "cpu" else None,
        channels_last=(args.torch_layout == "channels_last"
                       or (args.torch_layout == "auto" and args.device == "gpu")))
    pf = Prefetcher(src, 0, depth=PREFETCH_DEPTH, workers=args.workers or None)

    def close() -> None:
        pf.close()
        src.close()

    res = Result("pytorch", config=cfg)
    t0 = time.perf_counter()
    first = step(next(pf))
    res.first_step_s = time.perf_counter() - t0
    return Contender(res, lambda: step(next(pf)), close, [first])


def measure(contenders: list[Contender], args: argparse.Namespace, peak: float) -> None:
    """Warm-up, then the timed iterations; interleaved (one step of each in turn) unless
    --sequential, so that both frameworks see the same load on a shared machine."""
    for c in contenders:
        for _ in range(max(0, args.warmup - 1)):
            c.losses.append(c.step())
    times: dict[str, list[float]] = {c.result.name: [] for c in contenders}
    waited: dict[str, list[float]] = {c.result.name: [] for c in contenders}
    order = ([contenders] * args.iterations if not args.sequential
             else [[c] for c in contenders for _ in range(args.iterations)])
    for group in order:
        for c in group:
            t0 = time.perf_counter()
            c.losses.append(c.step())
            times[c.result.name].append(time.perf_counter() - t0)
            if c.waits:
                waited[c.result.name].append(c.waits[-1])
    for c in contenders:
        if not all(map(math.isfinite, c.losses)):
            raise SystemExit(f"{c.result.name}: non-finite loss {c.losses}")
        c.result.config += f", loss {c.losses[0]:.3f} -> {c.losses[-1]:.3f}"
        _finish(c.result, common.Timing(times[c.result.name], args.batch_size), peak)
        if waited[c.result.name]:
            c.result.extra["input_wait_share"] = (sum(waited[c.result.name])
                                                  / sum(times[c.result.name]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="float32")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--iterations", type=int, default=8, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations (incl. the first)")
    p.add_argument("--workers", type=int, default=0,
                   help="input pipeline threads (default 0: one per core)")
    p.add_argument("--records", type=int, default=0,
                   help=f"LMDB records (default {RECORD_BATCHES} batches)")
    p.add_argument("--allocator", choices=common.ALLOCATORS, default="auto")
    p.add_argument("--conv-plans", default="auto",
                        choices=("auto", "remeasure", "cached", "heuristic"),
                   help="model/autotune.py mode: auto measures missing plans once per machine")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--torch-only", action="store_true", help="diagnostics: only PyTorch")
    p.add_argument("--sequential", action="store_true",
                   help="time all of ours, then all of PyTorch (default: alternate steps)")
    p.add_argument("--torch-layout", choices=("auto", "channels_last", "nchw"), default="auto",
                   help="PyTorch memory format; auto: NCHW on CPU (channels_last trained 20%% "
                        "slower on the 2-core machine), channels_last on GPU (cuDNN's NHWC)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.iterations < 1 or args.warmup < 1:
        p.error("--batch-size, --iterations and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.reexec_with_allocator(args.allocator)
    from model import autotune

    autotune.configure(mode=args.conv_plans, notify=lambda line: print(f"# {line}", flush=True))
    devices = jax_devices(args.device)
    peak = matmul_peak(devices, args.precision)
    records = args.records or RECORD_BATCHES * args.batch_size
    import torch_alexnet

    print(common.header("benchmarks/train.py",
                        ("torch",) if torch_alexnet.available() else ()), flush=True)
    print(f"# bvlc_alexnet training, batch {args.batch_size}, {args.precision}, "
          f"{len(devices)} {args.device} device(s), allocator {common.allocator_in_use()}, "
          f"{os.cpu_count()} CPUs, matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        t0 = time.perf_counter()
        data = common.build_lmdb(Path(tmp), records)
        print(f"# LMDB: {records} random 256x256 raw Datums built in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        contenders: list[Contender] = []
        try:
            if not args.torch_only:
                contenders.append(setup_ours(data, args, devices))
            if not args.no_torch and torch_alexnet.available():
                contenders.append(setup_torch(data, args))
            measure(contenders, args, peak)
        finally:
            for c in contenders:
                c.close()
    by_name = {c.result.name: c.result for c in contenders}
    ours, theirs = by_name.get("ours", Result("ours")), by_name.get("pytorch")
    for r in by_name.values():
        print(r.line(), flush=True)
    if "input_wait_share" in ours.extra:
        print(f"# ours: waiting for input {ours.extra['input_wait_share']:.2%} of the step time "
              "(target < 2%)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "allocator": common.allocator_in_use(),
                                         "ours": asdict(ours),
                                         "pytorch": asdict(theirs) if theirs else None},
                                        indent=1))
    if theirs is None or not ours.img_per_s:
        print(f"train img/s: ours {ours.img_per_s:.2f}, pytorch n/a, ratio n/a")
    else:
        print(f"train img/s: ours {ours.img_per_s:.2f}, pytorch {theirs.img_per_s:.2f}, "
              f"ratio {ours.img_per_s / theirs.img_per_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
