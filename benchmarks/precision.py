"""Does `--precision bf16` train to float32's accuracy? Two small nets, both precisions, same run.

Usage: python benchmarks/precision.py [--nets alexnet_mini,lenet] [--iterations N]
                                      [--seeds 1701,1702] [--allocator auto|jemalloc|system]

- alexnet_mini (model/zoo/alexnet_mini: AlexNet's layer sequence, groups, LRN, ceil pooling)
  on a mini ILSVRC12 of 10 classes rendered by data/mini.py (shapes and textures, 100 train
  and 20 val images per class, 64x64 records), with the zoo solver (300 iterations);
- Caffe's LeNet (examples/mnist/lenet_train_test.prototxt and lenet_solver.prototxt: two
  conv+pool, ip 500, ip 10, inv lr policy) on rendered digits: the ten digits drawn by
  OpenCV's Hershey fonts at random font, size, stroke, position and rotation with noise,
  28x28 grayscale (4000 train, 1000 val), 1000 iterations at batch 64.

Each net trains once per precision and seed with model.train.train (same records, crops,
mirrors and dropout masks); the script prints the final TEST accuracy and loss, the last
training loss and img/s of each run, then the bf16 - fp32 accuracy difference per net. The
header names the CPU (bf16 speed depends on avx512_bf16 / AMX) and the versions.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

from data.datum import encode_datum_bytes  # noqa: E402
from data.lmdb_io import LmdbWriter  # noqa: E402
from data.mean import compute_image_mean  # noqa: E402

PRECISIONS = ("fp32", "bf16")
MINI_CLASSES, MINI_TRAIN, MINI_VAL, MINI_HW = 10, 100, 20, 64
DIGITS_TRAIN, DIGITS_VAL, DIGITS_HW = 4000, 1000, 28
# Hershey fonts OpenCV draws without any font file.
DIGIT_FONTS = (0, 2, 3, 4, 6, 7)
DIGIT_NOISE_SIGMA = 20.0
DIGIT_MAX_ROTATION_DEG = 15.0

# Caffe's examples/mnist/lenet_train_test.prototxt (sources renamed; scale 1/256).
LENET = """name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "digits_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "digits_val_lmdb" batch_size: 100 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
# Caffe's examples/mnist/lenet_solver.prototxt, max_iter and test cadence scaled to the set.
LENET_SOLVER = """net: "lenet_train_test.prototxt"
test_iter: 10
test_interval: {iterations}
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: {iterations}
snapshot: 0
snapshot_after_train: false
snapshot_prefix: "lenet"
solver_mode: CPU
random_seed: {seed}
"""
LENET_ITERATIONS = 1000
ALEXNET_MINI_ITERATIONS = 300  # model/zoo/alexnet_mini/solver.prototxt max_iter


@dataclass
class Run:
    net: str
    precision: str
    seed: int
    accuracy: float
    test_loss: float
    last_loss: float
    img_per_s: float
    seconds: float


def mini_records(folder: Path) -> None:
    """10 classes of data/mini.py's rendered images as 64x64 raw records + their mean."""
    import cv2

    from data.mini import render_image

    rng = np.random.default_rng(0)
    for name, per_class in (("train", MINI_TRAIN), ("val", MINI_VAL)):
        db = folder / "examples" / "imagenet" / f"ilsvrc12_{name}_lmdb"
        db.parent.mkdir(parents=True, exist_ok=True)
        order = rng.permutation(MINI_CLASSES * per_class)
        with LmdbWriter(db) as writer:
            for i, k in enumerate(order):
                label = int(k % MINI_CLASSES)
                img, _ = render_image(label, rng)
                bgr = cv2.resize(np.asarray(img)[:, :, ::-1], (MINI_HW, MINI_HW),
                                 interpolation=cv2.INTER_LINEAR)
                writer.put(f"{i:08d}_{name}".encode(),
                           encode_datum_bytes(np.ascontiguousarray(bgr.transpose(2, 0, 1)), label))
    mean = folder / "data" / "ilsvrc12" / "imagenet_mean.binaryproto"
    mean.parent.mkdir(parents=True, exist_ok=True)
    compute_image_mean(folder / "examples" / "imagenet" / "ilsvrc12_train_lmdb", mean,
                       show_progress=False)
    zoo = common.REPO / "model" / "zoo" / "alexnet_mini"
    (folder / "model" / "zoo" / "alexnet_mini").mkdir(parents=True, exist_ok=True)
    for f in ("train_val.prototxt", "solver.prototxt"):
        shutil.copy(zoo / f, folder / "model" / "zoo" / "alexnet_mini" / f)


def digit_image(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A 28x28 uint8 digit: random Hershey font, scale, stroke, offset, rotation and noise."""
    import cv2

    big = 4 * DIGITS_HW
    canvas = np.zeros((big, big), np.uint8)
    font = int(rng.choice(DIGIT_FONTS))
    scale = rng.uniform(2.5, 4.0)
    thick = int(rng.integers(6, 14))
    (tw, th), _ = cv2.getTextSize(str(digit), font, scale, thick)
    x = int((big - tw) / 2 + rng.uniform(-0.12, 0.12) * big)
    y = int((big + th) / 2 + rng.uniform(-0.12, 0.12) * big)
    cv2.putText(canvas, str(digit), (x, y), font, scale, 255, thick, cv2.LINE_AA)
    rot = cv2.getRotationMatrix2D((big / 2, big / 2),
                                  rng.uniform(-DIGIT_MAX_ROTATION_DEG, DIGIT_MAX_ROTATION_DEG), 1.0)
    canvas = cv2.warpAffine(canvas, rot, (big, big))
    small = cv2.resize(canvas, (DIGITS_HW, DIGITS_HW), interpolation=cv2.INTER_AREA)
    noisy = small.astype(np.float32) + rng.normal(0, DIGIT_NOISE_SIGMA, small.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def digit_records(folder: Path) -> None:
    rng = np.random.default_rng(1)
    for name, count in (("train", DIGITS_TRAIN), ("val", DIGITS_VAL)):
        with LmdbWriter(folder / f"digits_{name}_lmdb") as writer:
            for i in range(count):
                digit = int(rng.integers(10))
                writer.put(f"{i:08d}".encode(),
                           encode_datum_bytes(digit_image(rng, digit)[np.newaxis], digit))
    (folder / "lenet_train_test.prototxt").write_text(LENET)


def train_once(net: str, folder: Path, precision: str, seed: int, iterations: int) -> Run:
    from model.train import train

    if net == "lenet":
        solver = folder / f"lenet_solver_{seed}.prototxt"
        solver.write_text(LENET_SOLVER.format(iterations=iterations, seed=seed))
    else:
        text = (folder / "model/zoo/alexnet_mini/solver.prototxt").read_text()
        text = text.replace("random_seed: 1701", f"random_seed: {seed}")
        iterations = iterations or ALEXNET_MINI_ITERATIONS
        text = text.replace(f"max_iter: {ALEXNET_MINI_ITERATIONS}", f"max_iter: {iterations}")
        # The final test only (Solve's closing TestAll, when iter % test_interval == 0).
        text = text.replace("test_interval: 100", f"test_interval: {iterations}")
        text = text.replace("snapshot: 100", "snapshot: 0")
        solver = folder / f"alexnet_mini_solver_{seed}.prototxt"
        solver.write_text(text + "\nsnapshot_after_train: false\ntest_initialization: false\n")
    started = time.perf_counter()
    result = train(solver, workdir=folder, precision=precision, log=lambda line: None)
    seconds = time.perf_counter() - started
    outs = result.final_test_outputs
    losses = result.losses
    return Run(net, precision, seed, outs.get("accuracy", math.nan), outs.get("loss", math.nan),
               losses[max(losses)] if losses else math.nan, result.images_per_second, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="alexnet_mini,lenet")
    p.add_argument("--iterations", type=int, default=0,
                   help=f"override max_iter (default: alexnet_mini's 300, LeNet {LENET_ITERATIONS})")
    p.add_argument("--seeds", default="1701,1702")
    p.add_argument("--allocator", choices=common.ALLOCATORS, default="auto")
    args = p.parse_args(argv)
    common.reexec_with_allocator(args.allocator)
    import jax  # noqa: F401  (for the header's versions)

    print(common.header("benchmarks/precision.py"), flush=True)
    nets = [n for n in args.nets.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        if "alexnet_mini" in nets:
            mini_records(folder)
        if "lenet" in nets:
            digit_records(folder)
        print(f"# records built in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"{'net':13} {'precision':9} {'seed':>5} {'accuracy':>9} {'test loss':>9} "
              f"{'last loss':>9} {'img/s':>8} {'seconds':>8}", flush=True)
        for net in nets:
            iterations = args.iterations or (LENET_ITERATIONS if net == "lenet" else 0)
            for seed in seeds:
                for precision in PRECISIONS:
                    r = train_once(net, folder, precision, seed, iterations)
                    runs.append(r)
                    print(f"{r.net:13} {r.precision:9} {r.seed:5d} {r.accuracy:9.4f} "
                          f"{r.test_loss:9.4f} {r.last_loss:9.4f} {r.img_per_s:8.1f} "
                          f"{r.seconds:8.1f}", flush=True)
    for net in nets:
        acc = {pr: [r.accuracy for r in runs if r.net == net and r.precision == pr]
               for pr in PRECISIONS}
        diffs = [b - a for a, b in zip(acc["fp32"], acc["bf16"])]
        print(f"{net}: accuracy fp32 {', '.join(f'{a:.4f}' for a in acc['fp32'])}; bf16 "
              f"{', '.join(f'{a:.4f}' for a in acc['bf16'])}; bf16 - fp32 per seed "
              f"{', '.join(f'{d:+.4f}' for d in diffs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
