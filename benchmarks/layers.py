"""Per-layer forward+backward timing of bvlc_alexnet's convolutions and max-pools: the plain
lax reference, the model/kernels.py variants, and PyTorch (when importable) on the same shapes.

Usage: python benchmarks/layers.py [--batch-size 32] [--reps 5] [--layers conv2,pool1]
                                   [--no-torch] [--threads N]

Prints one row per (layer, implementation): median ms per forward+backward over --reps timed
calls after one warm-up call, and GFLOP/s for convolutions (3x the forward FLOPs: forward,
input gradient (not for conv1, whose input is data), weight gradient). Use it to choose
model.kernels.auto_plan; timings on the shared 2-core machine vary by +-10-30%.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import kernels  # noqa: E402


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


# bvlc_alexnet (model/zoo/bvlc_alexnet/train_val.prototxt) at 227x227 input.
ALEXNET_CONVS = (
    ConvShape("conv1", 3, 227, 96, 11, 4, 0, 1, needs_dx=False),
    ConvShape("conv2", 96, 27, 256, 5, 1, 2, 2),
    ConvShape("conv3", 256, 13, 384, 3, 1, 1, 1),
    ConvShape("conv4", 384, 13, 384, 3, 1, 1, 2),
    ConvShape("conv5", 384, 13, 256, 3, 1, 1, 2),
)
ALEXNET_POOLS = (PoolShape("pool1", 96, 55), PoolShape("pool2", 256, 27), PoolShape("pool5", 256, 13))


def conv_gflop(s: ConvShape, batch: int) -> float:
    ho, _ = kernels.conv_output_hw((s.hw, s.hw), (s.k, s.k), (s.stride,) * 2, (s.pad,) * 2, (1, 1))
    fwd = 2.0 * batch * s.o * ho * ho * (s.c // s.groups) * s.k * s.k
    return fwd * (3 if s.needs_dx else 2) / 1e9


def time_calls(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and CPU (all threads) seconds of fn() (which must block) after a warm-up.

    CPU seconds are the steadier figure on a loaded machine: they count work, not waiting."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _jax_conv_fn(s: ConvShape, conv: Callable, batch: int):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, s.c, s.hw, s.hw), np.float32))
    w = jnp.asarray(rng.standard_normal((s.o, s.c // s.groups, s.k, s.k), np.float32) * 0.01)
    b = jnp.zeros((s.o,), jnp.float32)

    def loss(x, w, b):
        y = conv(x, w, b, s.stride, s.pad, 1, s.groups)
        return jnp.sum(y * y) * 0.5

    argnums = (0, 1, 2) if s.needs_dx else (1, 2)
    step = jax.jit(jax.grad(loss, argnums=argnums))
    return lambda: jax.block_until_ready(step(x, w, b))


def _jax_pool_fn(s: PoolShape, pool: Callable, batch: int):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, s.c, s.hw, s.hw), np.float32))
    step = jax.jit(jax.grad(lambda x: jnp.sum(pool(x, s.k, s.stride, 0) ** 2)))
    return lambda: jax.block_until_ready(step(x))


def jax_variants() -> dict[str, Callable]:
    """Convolution implementations to compare: lax reference, lax split per group, kernels."""

    def lax_split(x, w, b, stride, pad, dil, groups):
        cg, og = x.shape[1] // groups, w.shape[0] // groups
        ys = [kernels.conv2d_reference(x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], None,
                                       stride, pad, dil, 1) for g in range(groups)]
        return jnp.concatenate(ys, axis=1) + b.reshape(1, -1, 1, 1)

    out: dict[str, Callable] = {"lax feature_group_count": kernels.conv2d_reference,
                                "lax split per group": lax_split}
    for f in kernels.FORWARD_METHODS:
        for d in kernels.INPUT_GRAD_METHODS:
            plan = kernels.ConvPlan(f, d)
            out[f"kernels fwd={f} dx={d}"] = (
                lambda x, w, b, st, p, dl, g, plan=plan: kernels.conv2d(x, w, b, st, p, dl, g, plan=plan)
            )
    return out


def _torch_conv_fn(s: ConvShape, batch: int, channels_last: bool):
    import torch

    x = torch.randn(batch, s.c, s.hw, s.hw, requires_grad=s.needs_dx)
    conv = torch.nn.Conv2d(s.c, s.o, s.k, s.stride, s.pad, groups=s.groups)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(s.needs_dx)
        conv = conv.to(memory_format=torch.channels_last)

    def run():
        conv.zero_grad()
        y = conv(x)
        (y * y).sum().mul(0.5).backward()

    return run


def _torch_pool_fn(s: PoolShape, batch: int):
    import torch

    x = torch.randn(batch, s.c, s.hw, s.hw, requires_grad=True)

    def run():
        x.grad = None
        (torch.nn.functional.max_pool2d(x, s.k, s.stride, ceil_mode=True) ** 2).sum().backward()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", default="", help="comma-separated subset, e.g. conv2,pool1")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch intra-op threads (default: all cores)")
    args = parser.parse_args(argv)
    wanted = set(filter(None, args.layers.split(",")))
    torch_ok = False
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch_ok = True
        except ImportError:
            pass

    print(f"{'layer':7} {'implementation':30} {'ms':>9} {'cpu ms':>9} {'GFLOP/s':>8}")
    for s in ALEXNET_CONVS:
        if wanted and s.name not in wanted:
            continue
        gf = conv_gflop(s, args.batch_size)
        rows = [(name, _jax_conv_fn(s, fn, args.batch_size)) for name, fn in jax_variants().items()]
        if torch_ok:
            rows.append(("pytorch", _torch_conv_fn(s, args.batch_size, False)))
            rows.append(("pytorch channels_last", _torch_conv_fn(s, args.batch_size, True)))
        for name, fn in rows:
            sec, cpu = time_calls(fn, args.reps)
            print(f"{s.name:7} {name:30} {sec * 1e3:9.1f} {cpu * 1e3:9.1f} {gf / sec:8.1f}",
                  flush=True)
    for p in ALEXNET_POOLS:
        if wanted and p.name not in wanted:
            continue
        rows = [("lax reduce_window", _jax_pool_fn(p, kernels.max_pool2d_reference, args.batch_size)),
                ("kernels first-max", _jax_pool_fn(p, kernels.max_pool2d, args.batch_size))]
        if torch_ok:
            rows.append(("pytorch", _torch_pool_fn(p, args.batch_size)))
        for name, fn in rows:
            sec, cpu = time_calls(fn, args.reps)
            print(f"{p.name:7} {name:30} {sec * 1e3:9.1f} {cpu * 1e3:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
