"""Per-layer forward+backward timing of bvlc_alexnet's layers, ours against PyTorch, same run.

Usage: python benchmarks/layers.py [--batch-size 32] [--rounds 5] [--layers conv2,pool1,lrn1]
                                   [--all-plans] [--no-torch] [--threads N]
                                   [--allocator auto|jemalloc|system] [--conv-plans auto|...]

Layers: the five convolutions, the three max-pools, the two LRNs and the three inner products
of model/zoo/bvlc_alexnet at 227x227 input. Ours are the functions the nets call on CPU
(model/layers/vision.py -> model/kernels.py; a convolution runs the plan model/autotune.py
chose for this machine, measured first if the cache lacks it, the built-in rule and XLA's own
plan beside it; --all-plans times every candidate: the eight direct plans, and the two
Winograd ones for 3x3 stride-1 layers). PyTorch runs the same shapes (NCHW; the LRN as
benchmarks/torch_alexnet.py's shift-sum, its fastest on CPU, and as nn.LocalResponseNorm).

Each row: median wall ms and median CPU ms (all threads; the steadier figure on a loaded
machine) of one forward + backward over --rounds rounds in which every implementation of the
layer runs once in turn, after a compiled warm-up call; GFLOP/s for convolutions and inner
products (forward FLOPs x 3; x 2 for conv1, whose input needs no gradient). The summary
table gives ours (the chosen plan) against PyTorch per layer and in total; the header names
the CPU (model, family, ISA flags), the load average and the versions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)


@dataclass(frozen=True)
class ConvShape:
    name: str
    c: int
    hw: int
    o: int
    k: int
    stride: int
    pad: int
    groups: int
    needs_dx: bool = True


@dataclass(frozen=True)
class PoolShape:
    name: str
    c: int
    hw: int
    k: int = 3
    stride: int = 2


@dataclass(frozen=True)
class LrnShape:
    name: str
    c: int
    hw: int


@dataclass(frozen=True)
class FcShape:
    name: str
    inputs: int
    outputs: int


# bvlc_alexnet (model/zoo/bvlc_alexnet/train_val.prototxt) at 227x227 input.
ALEXNET_CONVS = (
    ConvShape("conv1", 3, 227, 96, 11, 4, 0, 1, needs_dx=False),
    ConvShape("conv2", 96, 27, 256, 5, 1, 2, 2),
    ConvShape("conv3", 256, 13, 384, 3, 1, 1, 1),
    ConvShape("conv4", 384, 13, 384, 3, 1, 1, 2),
    ConvShape("conv5", 384, 13, 256, 3, 1, 1, 2),
)
ALEXNET_POOLS = (PoolShape("pool1", 96, 55), PoolShape("pool2", 256, 27),
                 PoolShape("pool5", 256, 13))
ALEXNET_LRNS = (LrnShape("norm1", 96, 55), LrnShape("norm2", 256, 27))
ALEXNET_FCS = (FcShape("fc6", 256 * 6 * 6, 4096), FcShape("fc7", 4096, 4096),
               FcShape("fc8", 4096, 1000))
# bvlc_alexnet's LRN: local_size 5, alpha 1e-4, beta 0.75 (k 1).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0
WEIGHT_SCALE = 0.01
OURS = "ours"          # the row of our implementation the summary compares
PYTORCH = "pytorch"    # ... and PyTorch's


def conv_gflop(s: ConvShape, batch: int) -> float:
    from model import kernels

    ho, _ = kernels.conv_output_hw((s.hw, s.hw), (s.k, s.k), (s.stride,) * 2, (s.pad,) * 2,
                                   (1, 1))
    fwd = 2.0 * batch * s.o * ho * ho * (s.c // s.groups) * s.k * s.k
    return fwd * (3 if s.needs_dx else 2) / 1e9


def fc_gflop(s: FcShape, batch: int) -> float:
    return 3 * 2.0 * batch * s.inputs * s.outputs / 1e9


# -- ours -------------------------------------------------------------------------------------
def _rand(shape: tuple[int, ...], scale: float = 1.0):
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32) * scale)


def _jax_call(fn: Callable, *args) -> Callable[[], object]:
    """fn(*args) compiled once; the returned thunk runs it to completion."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args))


def jax_conv(s: ConvShape, batch: int, plan) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    from model import kernels

    x = _rand((batch, s.c, s.hw, s.hw))
    w = _rand((s.o, s.c // s.groups, s.k, s.k), WEIGHT_SCALE)
    b = jnp.zeros((s.o,), jnp.float32)

    def loss(x, w, b):
        y = kernels.conv2d(x, w, b, s.stride, s.pad, 1, s.groups, plan=plan)
        return jnp.sum(y * y) * 0.5

    return _jax_call(jax.grad(loss, argnums=(0, 1, 2) if s.needs_dx else (1, 2)), x, w, b)


def jax_pool(s: PoolShape, batch: int, reference: bool) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    from model import kernels

    pool = kernels.max_pool2d_reference if reference else kernels.max_pool2d
    return _jax_call(jax.grad(lambda x: jnp.sum(pool(x, s.k, s.stride, 0) ** 2)),
                     _rand((batch, s.c, s.hw, s.hw)))


def jax_lrn(s: LrnShape, batch: int) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    from model.layers.vision import lrn_across_channels

    def loss(x):
        return jnp.sum(lrn_across_channels(x, LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K) ** 2)

    return _jax_call(jax.grad(loss), _rand((batch, s.c, s.hw, s.hw)))


def jax_fc(s: FcShape, batch: int) -> Callable[[], object]:
    import jax
    import jax.numpy as jnp

    from model.layers.vision import CONV_PRECISION

    def loss(x, w, b):
        # model/layers/common.py InnerProduct: x (N, K) . W^T (K, O) + b, full float32.
        y = jnp.dot(x, w.T, precision=CONV_PRECISION) + b
        return jnp.sum(y * y) * 0.5

    return _jax_call(jax.grad(loss, argnums=(0, 1, 2)), _rand((batch, s.inputs)),
                     _rand((s.outputs, s.inputs), WEIGHT_SCALE), jnp.zeros((s.outputs,)))


# -- PyTorch ----------------------------------------------------------------------------------
def torch_conv(s: ConvShape, batch: int) -> Callable[[], object]:
    import torch

    x = torch.randn(batch, s.c, s.hw, s.hw, requires_grad=s.needs_dx)
    conv = torch.nn.Conv2d(s.c, s.o, s.k, s.stride, s.pad, groups=s.groups)

    def run():
        conv.zero_grad()
        x.grad = None
        y = conv(x)
        (y * y).sum().mul(0.5).backward()

    return run


def torch_pool(s: PoolShape, batch: int) -> Callable[[], object]:
    import torch

    x = torch.randn(batch, s.c, s.hw, s.hw, requires_grad=True)

    def run():
        x.grad = None
        (torch.nn.functional.max_pool2d(x, s.k, s.stride, ceil_mode=True) ** 2).sum().backward()

    return run


def torch_lrn(s: LrnShape, batch: int, builtin: bool) -> Callable[[], object]:
    import torch
    import torch_alexnet

    x = torch.randn(batch, s.c, s.hw, s.hw, requires_grad=True)
    lrn = torch_alexnet.lrn_module(torch, "torch" if builtin else "shiftsum")

    def run():
        x.grad = None
        (lrn(x) ** 2).sum().backward()

    return run


def torch_fc(s: FcShape, batch: int) -> Callable[[], object]:
    import torch

    x = torch.randn(batch, s.inputs, requires_grad=True)
    fc = torch.nn.Linear(s.inputs, s.outputs)

    def run():
        fc.zero_grad()
        x.grad = None
        y = fc(x)
        (y * y).sum().mul(0.5).backward()

    return run


# -- timing -----------------------------------------------------------------------------------
@dataclass
class Row:
    layer: str
    impl: str
    wall: list[float]
    cpu: list[float]
    gflop: float = 0.0


def interleaved(layer: str, impls: dict[str, Callable[[], object]], rounds: int,
                gflop: float = 0.0) -> list[Row]:
    """Warm-up call of each, then `rounds` rounds in which each runs once, in turn."""
    for fn in impls.values():
        fn()
    rows = {name: Row(layer, name, [], [], gflop) for name in impls}
    for _ in range(max(1, rounds)):
        for name, fn in impls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            rows[name].wall.append(time.perf_counter() - t0)
            rows[name].cpu.append(time.process_time() - c0)
    for row in rows.values():
        med = statistics.median(row.wall)
        rate = f"{row.gflop / med:8.1f}" if row.gflop else " " * 8
        print(f"{row.layer:7} {row.impl:36} {med * 1e3:9.1f} {statistics.median(row.cpu) * 1e3:9.1f}"
              f" {rate}", flush=True)
    return list(rows.values())


def conv_impls(s: ConvShape, batch: int, all_plans: bool, torch_ok: bool
               ) -> dict[str, Callable[[], object]]:
    import numpy as np

    from model import autotune, kernels

    chosen = autotune.conv_plan((batch, s.c, s.hw, s.hw), (s.o, s.c // s.groups, s.k, s.k),
                                (s.stride,) * 2, (s.pad,) * 2, (1, 1), s.groups,
                                np.dtype(np.float32).name)
    rule = kernels.heuristic_plan((s.stride,) * 2, (s.k, s.k))
    plans = {f"{OURS} ({chosen.name})": chosen}
    for label, plan in (("built-in rule", rule), ("XLA", kernels.XLA_PLAN)):
        if plan != chosen:
            plans[f"{label} ({plan.name})"] = plan
    if all_plans:
        for plan in kernels.candidate_plans((s.k, s.k), (s.stride,) * 2, (s.pad,) * 2, (1, 1),
                                            "float32"):
            if plan not in plans.values():
                plans[plan.name] = plan
    impls = {name: jax_conv(s, batch, plan) for name, plan in plans.items()}
    if torch_ok:
        impls[PYTORCH] = torch_conv(s, batch)
    return impls


def summary(rows: list[Row]) -> None:
    """Ours (the chosen plan) against PyTorch, per layer and in total (median wall ms)."""
    by_layer: dict[str, dict[str, float]] = {}
    for row in rows:
        kind = OURS if row.impl.startswith(OURS) else PYTORCH if row.impl == PYTORCH else None
        if kind:
            by_layer.setdefault(row.layer, {})[kind] = statistics.median(row.wall) * 1e3
    print("\n| layer | ours ms | PyTorch ms | PyTorch / ours |\n|---|---|---|---|")
    total = {OURS: 0.0, PYTORCH: 0.0}
    for layer, ms in by_layer.items():
        if PYTORCH not in ms:
            print(f"| {layer} | {ms[OURS]:.1f} | n/a | |")
            continue
        for k in total:
            total[k] += ms[k]
        print(f"| {layer} | {ms[OURS]:.1f} | {ms[PYTORCH]:.1f} | {ms[PYTORCH] / ms[OURS]:.2f} |")
    if total[PYTORCH]:
        print(f"| total | {total[OURS]:.0f} | {total[PYTORCH]:.0f} | "
              f"{total[PYTORCH] / total[OURS]:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", default="", help="comma-separated subset, e.g. conv2,pool1")
    parser.add_argument("--all-plans", action="store_true",
                        help="time every candidate convolution plan, not only chosen/rule/XLA")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch intra-op threads (default: all cores)")
    parser.add_argument("--allocator", choices=common.ALLOCATORS, default="auto")
    parser.add_argument("--conv-plans", default="auto",
                        choices=("auto", "remeasure", "cached", "heuristic"),
                        help="model/autotune.py mode for the 'ours' rows")
    args = parser.parse_args(argv)
    common.reexec_with_allocator(args.allocator)
    wanted = set(filter(None, args.layers.split(",")))
    torch_ok = False
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch_ok = True
        except ImportError:
            pass
    import jax  # noqa: F401  (for the header's versions)

    from model import autotune

    autotune.configure(mode=args.conv_plans, notify=lambda line: print(f"# {line}", flush=True))
    print(common.header("benchmarks/layers.py", ("torch",) if torch_ok else ()))
    print(f"# batch {args.batch_size}, forward + backward, median of {args.rounds} interleaved "
          f"rounds; conv plans: {autotune.mode()}")
    print(f"{'layer':7} {'implementation':36} {'wall ms':>9} {'cpu ms':>9} {'GFLOP/s':>8}")
    b = args.batch_size
    rows: list[Row] = []
    for s in ALEXNET_CONVS:
        if not wanted or s.name in wanted:
            rows += interleaved(s.name, conv_impls(s, b, args.all_plans, torch_ok), args.rounds,
                                conv_gflop(s, b))
    for p in ALEXNET_POOLS:
        if not wanted or p.name in wanted:
            impls = {f"{OURS} (first-max index)": jax_pool(p, b, reference=False),
                     "XLA reduce_window": jax_pool(p, b, reference=True)}
            if torch_ok:
                impls[PYTORCH] = torch_pool(p, b)
            rows += interleaved(p.name, impls, args.rounds)
    for n in ALEXNET_LRNS:
        if not wanted or n.name in wanted:
            impls = {OURS: jax_lrn(n, b)}
            if torch_ok:
                impls[PYTORCH] = torch_lrn(n, b, builtin=False)
                impls["pytorch nn.LocalResponseNorm"] = torch_lrn(n, b, builtin=True)
            rows += interleaved(n.name, impls, args.rounds)
    for f in ALEXNET_FCS:
        if not wanted or f.name in wanted:
            impls = {OURS: jax_fc(f, b)}
            if torch_ok:
                impls[PYTORCH] = torch_fc(f, b)
            rows += interleaved(f.name, impls, args.rounds, fc_gflop(f, b))
    summary(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
