"""`imagenet time --model=NET.prototxt [--iterations=50] [--phase=TRAIN] [--gpu=0]
[--batch_size=N] [--warmup=1]`: Caffe's `caffe time` (tools/caffe.cpp, time()).

Builds the net for the phase, then reports the average forward, backward and forward-backward
milliseconds per batch, as `caffe time` does, plus what XLA adds: the compile time of each
jitted function (reported separately, never averaged in) and images/s of forward-backward.
Forward is the jitted `Net.apply`; backward is the jitted VJP applied to saved residuals (the
work Caffe's Backward does); forward-backward is one jitted `jax.value_and_grad`. Inputs are
random data of the right shapes (Caffe times its Data layer's prefetched copy, which is
negligible); a Data or ImageData layer whose LMDB or listing is absent takes its shape from
crop_size, 3 channels, and the output says so. Per-layer times are not reported: XLA fuses
across layers.
"""
from __future__ import annotations

import argparse
import statistics
import time as _time
from pathlib import Path
from typing import Callable

from data.errors import ImagenetError
from flows.allocator import allocator_in_use
from flows.flags import add_flag, int_at_least

# caffe time's defaults (tools/caffe.cpp): 50 iterations, TRAIN phase.
DEFAULT_ITERATIONS = 50
DEFAULT_PHASE = "TRAIN"
# Untimed runs after compilation, so allocator and thread pools are warm.
DEFAULT_WARMUP = 1
# Channels assumed for a Data layer whose LMDB is absent (colour ImageNet records).
ASSUMED_CHANNELS = 3
MS_PER_S = 1000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "model", required=True, help="the net prototxt to time")
    add_flag(parser, "iterations", type=int_at_least(1), default=DEFAULT_ITERATIONS,
             help=f"timed iterations (default {DEFAULT_ITERATIONS})")
    add_flag(parser, "phase", default=DEFAULT_PHASE, help="TRAIN or TEST (default TRAIN)")
    add_flag(parser, "level", type=int, default=0, help="net state level (Caffe's --level)")
    add_flag(parser, "stage", default="", help="comma-separated net state stages")
    add_flag(parser, "gpu", default=None,
             help="run on GPU: an id or 'all' (times one device); default: JAX's default device")
    add_flag(parser, "batch_size", type=int_at_least(0), default=0,
             help="override the batch size of every input layer (0: the prototxt's)")
    add_flag(parser, "warmup", type=int_at_least(0), default=DEFAULT_WARMUP,
             help=f"untimed iterations after compiling (default {DEFAULT_WARMUP})")
    add_flag(parser, "seed", type=int, default=0, help="seed of the random weights and data")


def _input_shapes(net_param, phase: str, level: int, stages: list[str], batch_size: int,
                  notes: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes for every fed top: LMDB-derived where the LMDB exists, else from crop_size;
    the batch dimension replaced by --batch_size when given."""
    from model.layers import layer_class
    from model.net import DATABASE_INPUT_TYPES, data_layer_shapes, data_source_path
    from model.prototxt import filter_net

    shapes: dict[str, tuple[int, ...]] = {}
    for lp in filter_net(net_param, phase, level=level, stages=stages).layer:
        if lp.type in DATABASE_INPUT_TYPES:
            source = data_source_path(lp)
            if Path(source).exists():
                tops = data_layer_shapes(lp)
            else:
                crop = lp.transform_param.crop_size
                if not crop:
                    raise ImagenetError(
                        f"layer {lp.name!r}: {lp.type} source {source!r} not found "
                        f"(relative to {Path.cwd()}) and no crop_size to size random data; "
                        "run from the directory the prototxt's paths are relative to")
                n = batch_size or layer_class(lp.type, lp.name).batch_size_of(lp)
                tops = [(n, ASSUMED_CHANNELS, crop, crop)] + [(n,)] * (len(lp.top) - 1)
                notes.append(f"{lp.type} layer {lp.name!r}: source {source!r} not "
                             f"found; assuming {ASSUMED_CHANNELS}-channel images of shape "
                             f"{tops[0]}")
        elif lp.type == "Input":
            given = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
            tops = given * len(lp.top) if len(given) == 1 else given
        else:
            continue
        if batch_size:
            tops = [(batch_size,) + tuple(s[1:]) for s in tops]
        shapes.update(zip(lp.top, (tuple(s) for s in tops)))
    return shapes


def _device(gpu: str | None):
    import jax

    if gpu is None:
        return jax.devices()[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise ImagenetError(f"--gpu={gpu} given but JAX sees no GPU (backend: "
                            f"{jax.default_backend()}); drop --gpu to time on the CPU")
    if gpu == "all":
        return gpus[0]
    try:
        return gpus[int(gpu)]
    except (ValueError, IndexError):
        raise ImagenetError(f"--gpu={gpu}: valid ids are 0..{len(gpus) - 1} or 'all'") from None


def _num_classes(net) -> int:
    """Label range for random labels: the class axis of the blob scored against `label`."""
    fed = {top for spec in net.inputs for top in spec.tops[1:]}
    for layer in net.layers:
        bottoms = list(layer.param.bottom)
        if len(bottoms) > 1 and bottoms[1] in fed:
            shape = net.blob_shapes[bottoms[0]]
            if len(shape) > 1:
                return int(shape[1])
    return 1


def _timed(fn: Callable[[], object]) -> float:
    import jax

    start = _time.perf_counter()
    jax.block_until_ready(fn())
    return (_time.perf_counter() - start) * MS_PER_S


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ImagenetError("--model=NET.prototxt is required")
    if args.iterations < 1:
        raise ImagenetError(f"--iterations must be >= 1, got {args.iterations}")
    import jax

    from flows.commands.train import report_conv_plan_measuring
    from model import autotune
    from model.net import Net
    from model.prototxt import phase_value, read_net_parameter

    phase = "TRAIN" if phase_value(args.phase) == 0 else "TEST"
    stages = [s for s in args.stage.split(",") if s]
    net_param = read_net_parameter(args.model)
    notes: list[str] = []
    shapes = _input_shapes(net_param, phase, args.level, stages, args.batch_size, notes)
    net = Net(net_param, phase, stages=stages, level=args.level, input_shapes=shapes,
              source=args.model)
    device = _device(args.gpu)
    train = phase == "TRAIN"
    batch_n = net.inputs[0].shapes[0][0] if net.inputs else 1
    print(f"Net {net.name!r} phase {phase}: {len(net.layers)} layers, "
          f"{net.param_count():,} learnable parameters, batch {batch_n}, device {device}, "
          f"host allocator {allocator_in_use()}")
    for note in notes:
        print(note)
    print("Inputs are random data of the right shapes: "
          + ", ".join(f"{t} {s}" for spec in net.inputs for t, s in zip(spec.tops, spec.shapes)))
    key = jax.random.PRNGKey(args.seed)
    params = jax.device_put(net.init(jax.random.fold_in(key, 0)), device)
    batch = jax.device_put(net.random_batch(jax.random.fold_in(key, 1), _num_classes(net)),
                           device)
    rng = jax.random.fold_in(key, 2)

    def loss_fn(p, b, r):
        return net.apply(p, b, r, train)[1]

    forward = jax.jit(lambda p, b, r: net.apply(p, b, r, train))
    forward_saving = jax.jit(lambda p, b, r: jax.vjp(lambda q: loss_fn(q, b, r), p))
    backward = jax.jit(lambda vjp_fn, g: vjp_fn(g)[0])
    forward_backward = jax.jit(jax.value_and_grad(loss_fn))

    compile_ms: dict[str, float] = {}
    report_conv_plan_measuring()
    start = _time.perf_counter()
    forward_c = forward.lower(params, batch, rng).compile()
    # Convolution plans are measured (once per machine) while the forward is first traced:
    # reported on their own, not as compile time.
    tuning_s = sum(m.seconds for _, m in autotune.measured())
    compile_ms["forward"] = (_time.perf_counter() - start - tuning_s) * MS_PER_S
    start = _time.perf_counter()
    forward_saving_c = forward_saving.lower(params, batch, rng).compile()
    loss, vjp_fn = forward_saving_c(params, batch, rng)
    cotangent = jax.numpy.ones_like(loss)
    backward_c = backward.lower(vjp_fn, cotangent).compile()
    compile_ms["backward (with its residual-saving forward)"] = (_time.perf_counter() - start) * MS_PER_S
    start = _time.perf_counter()
    forward_backward_c = forward_backward.lower(params, batch, rng).compile()
    compile_ms["forward-backward"] = (_time.perf_counter() - start) * MS_PER_S
    print("Compile time: " + ", ".join(f"{k} {v:.0f} ms" for k, v in compile_ms.items()))
    if tuning_s:
        print(f"Convolution plans measured for this machine (once; model/autotune.py): "
              f"{len(autotune.measured())} shapes in {tuning_s:.1f} s")

    for _ in range(max(args.warmup, 0)):
        jax.block_until_ready(forward_c(params, batch, rng))
        jax.block_until_ready(backward_c(vjp_fn, cotangent))
        jax.block_until_ready(forward_backward_c(params, batch, rng))

    print("*** Benchmark begins ***")
    print(f"Testing for {args.iterations} iterations.")
    f_ms, b_ms, fb_ms = [], [], []
    for it in range(args.iterations):
        f_ms.append(_timed(lambda: forward_c(params, batch, rng)))
        _, vjp_fn = forward_saving_c(params, batch, rng)
        jax.block_until_ready(vjp_fn)
        b_ms.append(_timed(lambda: backward_c(vjp_fn, cotangent)))
        fb_ms.append(_timed(lambda: forward_backward_c(params, batch, rng)))
        print(f"Iteration: {it + 1} forward-backward time: {fb_ms[-1]:.0f} ms.")
    avg_fb = statistics.fmean(fb_ms)
    print(f"Average Forward pass: {statistics.fmean(f_ms):.2f} ms.")
    print(f"Average Backward pass: {statistics.fmean(b_ms):.2f} ms.")
    print(f"Average Forward-Backward: {avg_fb:.2f} ms.")
    print(f"Median Forward-Backward: {statistics.median(fb_ms):.2f} ms.")
    print(f"Images/s (forward-backward): {batch_n * MS_PER_S / avg_fb:.2f}")
    print(f"Total Time: {sum(f_ms) + sum(b_ms) + sum(fb_ms):.0f} ms.")
    print("*** Benchmark ends ***")
    return 0
