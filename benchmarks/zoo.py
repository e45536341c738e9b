"""Forward-backward time of the zoo's GoogLeNet and ResNet-50 (TRAIN phase), ours against a
plain-PyTorch twin of the same prototxt, interleaved in the same process.

Usage: python benchmarks/zoo.py [--nets bvlc_googlenet,resnet_50] [--batch-size 16]
       [--rounds 5] [--allocator auto|jemalloc|system]

Ours: model/zoo/<net>/train_val.prototxt as a Net at --batch-size 224x224, one jitted
jax.value_and_grad of the TRAIN loss (what `imagenet time` calls forward-backward: all three
GoogLeNet heads, BatchNorm on batch statistics, dropout on). PyTorch: benchmarks/torch_prototxt.py
builds the same layers with the same shapes; one forward + loss.backward(). No solver update on
either side (caffe time's forward-backward). Both see the same random batch. Each round runs
ours, then PyTorch, so a busy minute on a shared machine slows both; the report gives the
median and best over rounds and the ratio of medians (PyTorch ms / ours ms: > 1 means ours is
faster). The header prints the CPU model, its ISA flags of interest and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

NETS = ("bvlc_googlenet", "resnet_50")
CROP = 224
NUM_CLASSES = 1000


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def setup_ours(name: str, batch: int) -> tuple[Callable[[], Any], float, Any]:
    """(one forward-backward, compile seconds, the Net)."""
    import jax

    from model.net import Net

    net = Net.from_prototxt(common.REPO / "model" / "zoo" / name / "train_val.prototxt", "TRAIN",
                            input_shapes={"data": (batch, 3, CROP, CROP)})
    key = jax.random.PRNGKey(0)
    params = net.init(jax.random.fold_in(key, 0))
    data = net.random_batch(jax.random.fold_in(key, 1), NUM_CLASSES)
    rng = jax.random.fold_in(key, 2)
    step = jax.jit(jax.value_and_grad(lambda p, b, r: net.apply(p, b, r, True)[1]))
    start = time.perf_counter()
    compiled = step.lower(params, data, rng).compile()
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(compiled(params, data, rng))), compile_s, net


def setup_torch(name: str, net: Any, batch: int) -> Callable[[], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    import numpy as np

    import torch_prototxt
    from model.prototxt import filter_net, read_net_parameter

    torch.set_num_threads(os.cpu_count() or 1)
    param = filter_net(read_net_parameter(
        common.REPO / "model" / "zoo" / name / "train_val.prototxt"), "TRAIN")
    twin = torch_prototxt.build(torch, param, net.blob_shapes).train()
    rng = np.random.default_rng(1)
    data = torch.from_numpy(rng.standard_normal((batch, 3, CROP, CROP), dtype=np.float32))
    label = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=batch))

    def step() -> None:
        twin.zero_grad(set_to_none=True)
        twin(data=data, label=label).backward()

    return step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, from {NETS}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--allocator", default="auto", choices=sorted(common.ALLOCATORS))
    args = p.parse_args(argv)
    args.nets = [n for n in args.nets.split(",") if n]
    bad = [n for n in args.nets if n not in NETS]
    if bad:
        p.error(f"unknown nets {bad}; valid: {', '.join(NETS)}")
    if args.batch_size < 1 or args.rounds < 1:
        p.error("--batch-size and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.reexec_with_allocator(args.allocator)
    print(f"# zoo forward-backward, TRAIN phase, batch {args.batch_size} x 3x{CROP}x{CROP}, "
          f"float32, allocator {common.allocator_in_use()}", flush=True)
    print(common.header("benchmarks/zoo.py", ("torch",)), flush=True)
    summary = []
    for name in args.nets:
        ours, compile_s, net = setup_ours(name, args.batch_size)
        theirs = setup_torch(name, net, args.batch_size)
        for _ in range(args.warmup):
            ours()
            if theirs is not None:
                theirs()
        t_ours, t_torch = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(ours))
            if theirs is not None:
                t_torch.append(timed(theirs))
        line = (f"{name}: ours median {statistics.median(t_ours) * 1e3:.0f} ms "
                f"(best {min(t_ours) * 1e3:.0f}, {args.batch_size / statistics.median(t_ours):.1f}"
                f" img/s, compile {compile_s:.0f} s)")
        if t_torch:
            ratio = statistics.median(t_torch) / statistics.median(t_ours)
            line += (f"; pytorch median {statistics.median(t_torch) * 1e3:.0f} ms "
                     f"(best {min(t_torch) * 1e3:.0f}, "
                     f"{args.batch_size / statistics.median(t_torch):.1f} img/s); "
                     f"pytorch/ours {ratio:.2f}")
        else:
            line += "; pytorch n/a (pip install torch to compare)"
        print(line, flush=True)
        summary.append(line)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
