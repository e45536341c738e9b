"""Shared helpers of the benchmark scripts: the header every script prints (CPU model, ISA
flags, cores, load, versions: figures are only comparable on the same CPU), a small LMDB of
random 256x256 images (raw or JPEG-encoded Datums, as convert_imageset writes them) with its
mean file, the bvlc_alexnet train net pointed at it, timing statistics, and the jemalloc
re-exec.

Why jemalloc: with glibc's allocator both JAX and PyTorch page-fault ~1 GB per AlexNet step on
this machine (~1 s of system time per step, docs/MACHINE_NOTES.md); jemalloc with decay
disabled keeps freed pages. The benchmark re-executes itself with LD_PRELOAD when Debian's
libjemalloc2 is installed (both frameworks run in the same process, so both get it), and runs
as is when it is not.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.datum import encode_datum_bytes, encoded_datum_bytes, write_blobproto  # noqa: E402
from data.errors import ImagenetError  # noqa: E402
from data.lmdb_io import LmdbWriter  # noqa: E402
from data.proto import caffe_pb2  # noqa: E402
from flows import allocator  # noqa: E402
from model import machine  # noqa: E402

ALEXNET_TRAIN_VAL = REPO / "model" / "zoo" / "bvlc_alexnet" / "train_val.prototxt"
ALEXNET_SOLVER = REPO / "model" / "zoo" / "bvlc_alexnet" / "solver.prototxt"
# Forward + backward FLOPs of bvlc_alexnet per 227x227 image (3x the 1.45 GFLOP forward).
ALEXNET_TRAIN_GFLOP_PER_IMAGE = 4.35
IMAGE_HW = 256
NUM_CLASSES = 1000
ALLOCATORS = allocator.ALLOCATORS
allocator_in_use = allocator.allocator_in_use


def header(script: str, extra_versions: tuple[str, ...] = ()) -> str:
    """`# <script> on <CPU model (vendor family model), cores; ISA flags>` and a second line
    with the date, load average, allocator and versions (jax, and any of `extra_versions`
    already imported, e.g. torch): what a figure means depends on all of them."""
    versions = [f"Python {platform.python_version()}"]
    for name in ("numpy", "jax", "jaxlib", "cv2", "lmdb", *extra_versions):
        mod = sys.modules.get(name)
        if mod is not None:
            versions.append(f"{name} {getattr(mod, '__version__', '?')}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (f"# {script} on {machine.cpu_info().describe()}\n"
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
            f"{' '.join(f'{v:.2f}' for v in load)}, allocator {allocator_in_use()}, "
            f"{', '.join(versions)}")


def disk_bytes(path: Path) -> int:
    """Bytes allocated under `path` (du)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


class PeriodicSampler:
    """A `with` block during which `sample()` runs every `period_s` on a thread (once more at
    each end); subclasses keep the peaks they want."""

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reexec_with_allocator(choice: str) -> None:
    """Re-run this benchmark under jemalloc when `choice` asks for it (auto: if installed);
    flows/allocator.py is the switch the `imagenet` training commands use too."""
    try:
        allocator.reexec_with_allocator(choice)
    except ImagenetError as err:
        raise SystemExit(f"--{err}") from None


@dataclass(frozen=True)
class BenchData:
    lmdb: Path
    mean_file: Path
    records: int
    encoded: bool


def random_images(n: int, seed: int = 0, hw: int = IMAGE_HW) -> np.ndarray:
    """(n, 3, hw, hw) uint8: smooth random colour fields plus noise, so JPEGs of them have
    photo-like sizes (pure noise compresses badly and decodes slowly)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, hw, hw), np.uint8)
    for i in range(n):
        small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (hw, hw), interpolation=cv2.INTER_LINEAR).astype(np.int16)
        img += rng.integers(-12, 13, size=img.shape, dtype=np.int16)
        out[i] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


def build_lmdb(directory: Path, records: int, *, encoded: bool = False, seed: int = 0,
               name: str | None = None) -> BenchData:
    """An LMDB of `records` random 256x256 Datums (keys like convert_imageset's) and the
    mean file of its images."""
    import cv2

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or ("bench_encoded_lmdb" if encoded else "bench_raw_lmdb"))
    total = np.zeros((3, IMAGE_HW, IMAGE_HW), np.float64)
    chunk = 64
    rng = np.random.default_rng(seed)
    with LmdbWriter(path) as writer:
        for start in range(0, records, chunk):
            imgs = random_images(min(chunk, records - start), seed=seed + start)
            total += imgs.sum(axis=0, dtype=np.float64)
            for j, chw in enumerate(imgs):
                i = start + j
                label = int(rng.integers(NUM_CLASSES))
                key = f"{i:08d}_bench/{i:08d}.JPEG".encode()
                if encoded:
                    ok, jpg = cv2.imencode(".jpg", chw.transpose(1, 2, 0),
                                           [cv2.IMWRITE_JPEG_QUALITY, 90])
                    if not ok:
                        raise RuntimeError("cv2.imencode failed")
                    writer.put(key, encoded_datum_bytes(jpg.tobytes(), label))
                else:
                    writer.put(key, encode_datum_bytes(chw, label))
    mean_file = directory / (path.name + "_mean.binaryproto")
    write_blobproto(mean_file, (total / records).astype(np.float32))
    return BenchData(lmdb=path, mean_file=mean_file, records=records, encoded=encoded)


def alexnet_train_net(data: BenchData, batch_size: int) -> caffe_pb2.NetParameter:
    """bvlc_alexnet's train_val with the TRAIN Data layer reading `data` at `batch_size`."""
    from model.prototxt import read_net_parameter

    net = read_net_parameter(ALEXNET_TRAIN_VAL)
    found = False
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.source = str(data.lmdb)
            lp.data_param.batch_size = batch_size
            lp.transform_param.mean_file = str(data.mean_file)
            found = True
    if not found:
        raise RuntimeError(f"{ALEXNET_TRAIN_VAL} has no Data layer")
    return net


def alexnet_solver() -> caffe_pb2.SolverParameter:
    from model.solver import read_solver

    return read_solver(str(ALEXNET_SOLVER))


@dataclass(frozen=True)
class Timing:
    """Per-iteration seconds of the timed iterations."""

    seconds: list[float]
    batch_size: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def img_per_s(self) -> float:
        # Throughput over the whole timed window (what a training run sees).
        return self.batch_size * len(self.seconds) / sum(self.seconds)

    def range_ms(self) -> str:
        return f"{min(self.seconds) * 1e3:.0f}-{max(self.seconds) * 1e3:.0f}"
