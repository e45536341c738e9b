"""Benchmark: convert-imageset and compute-image-mean against naive baselines, same run.

    [CAFFE_BIN=/path/to/caffe/build/tools] .venv/bin/python benchmarks/convert.py [FOLDER]
        [--count 1000] [--resize 256] [--repeat 2] [--mean-rounds 9]
        [--process-rounds 5] [--mean-records 1000,10000]

FOLDER: a folder of JPEGs (every image file under it is listed, label 0). Without one, the
script writes `--count` photo-like JPEGs sized like ImageNet's (mostly 500x375 and 375x500,
quality 90) into a temporary folder. It prints images/s of:
- a naive single-process baseline (cv2.imread + cv2.resize + caffe_pb2.Datum + txn.put,
  commit every 1000: what a user would write), then data.convert.convert_imageset with 1 worker
  and with all cores as the command line runs it, and with all cores plus the content digest
  (the library default, for the pipeline's cache), each as a ratio to the baseline;
- a naive per-record mean (ParseFromString + np.frombuffer + float32 add), then
  data.mean.compute_image_mean, as a ratio.
The contenders take turns, round after round, and each figure is the best of its rounds
(--repeat for conversion, after the page cache is warmed; --mean-rounds for the mean, which
takes a tenth of a second and so also prints the lowest, median and highest per-round ratio,
the spread on a noisy machine). Not a test: speed claims live here, never in timed unit tests.

Then WHOLE PROCESSES, as a user runs them (Python start and imports included), over
--process-rounds interleaved rounds: `imagenet convert-imageset` on the images, and
`imagenet compute-image-mean` on LMDBs of each --mean-records count (the converted records,
repeated under new keys past the image count: 10,000 records are 1.9 GB, kept in page cache).
Where CAFFE_BIN names a folder holding Caffe's `convert_imageset` and `compute_image_mean`
(a Caffe build's build/tools), Caffe's own tools take their turn in the same rounds, on the
same inputs, and their records and mean files are compared with ours byte for byte. Each
process is reported as best and median wall seconds and median CPU seconds (user + system,
from the kernel's child accounting: the steadier figure on a loaded machine).
The header names the CPU (model, family, ISA flags), the load average and the versions.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import lmdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo on sys.path)

from data.convert import available_cores, convert_imageset  # noqa: E402
from data.lmdb_io import LmdbWriter  # noqa: E402
from data.mean import compute_image_mean  # noqa: E402
from data.proto import caffe_pb2  # noqa: E402

CAFFE_BIN_ENV = "CAFFE_BIN"
PROJECT_PACKAGES = ("data", "flows", "model", "tasks")
CAFFE_TOOLS = ("convert_imageset", "compute_image_mean")

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
# ImageNet's typical shapes (width, height) and how often the generator uses each.
SHAPES = [((500, 375), 0.6), ((375, 500), 0.25), ((500, 333), 0.1), ((500, 500), 0.05)]
JPEG_QUALITY = 90
# Texture of the synthetic photos: smooth blobs at several scales plus sensor-like noise, so
# the files compress like photos (~65 KB at q90 for 500x375), not like flat colour or noise.
OCTAVES = (4, 16, 64)
NOISE_SIGMA = 6.0
COMMIT_EVERY = 1000


def make_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    acc = np.zeros((height, width, 3), np.uint16)
    for cells in OCTAVES:
        small = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), np.uint8)
        acc += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    img = (acc // len(OCTAVES)).astype(np.int16)
    noise = np.empty_like(img)
    # Per-channel mean and sigma: a bare number would be Scalar(s, 0, 0) and spare G and R.
    cv2.randn(noise, (0, 0, 0), (NOISE_SIGMA,) * 3)  # seeded in generate() by cv2.setRNGSeed
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def generate(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cv2.setRNGSeed(seed)
    sizes = [s for s, _ in SHAPES]
    probs = [p for _, p in SHAPES]
    for i in range(count):
        width, height = sizes[rng.choice(len(sizes), p=probs)]
        ok, buf = cv2.imencode(".JPEG", make_photo(rng, width, height),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        (folder / f"img_{i:06d}.JPEG").write_bytes(buf.tobytes())


def write_listing(folder: Path, listfile: Path) -> int:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS)
    listfile.write_text("".join(f"{f} 0\n" for f in files))
    return len(files)


def naive_convert(root: Path, listfile: Path, db: Path, size: int) -> None:
    """decode + resize + Datum + put, one process, as a first attempt would be written."""
    env = lmdb.open(str(db), map_size=1 << 34)
    txn = env.begin(write=True)
    lines = listfile.read_text().splitlines()
    for i, line in enumerate(lines):
        path, label = line.rsplit(" ", 1)
        img = cv2.resize(cv2.imread(str(root / path), cv2.IMREAD_COLOR), (size, size))
        datum = caffe_pb2.Datum(channels=3, height=size, width=size,
                                data=img.transpose(2, 0, 1).tobytes(), label=int(label))
        txn.put(f"{i:08d}_{path}".encode(), datum.SerializeToString())
        if (i + 1) % COMMIT_EVERY == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()


def naive_mean(db: Path) -> np.ndarray:
    """Per-record loop: parse, view, add in float32 (Caffe's own arithmetic)."""
    env = lmdb.open(str(db), readonly=True, lock=False)
    total, count = None, 0
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = caffe_pb2.Datum()
            datum.ParseFromString(value)
            arr = np.frombuffer(datum.data, np.uint8).astype(np.float32)
            total = arr if total is None else total + arr
            count += 1
    env.close()
    return total / count


def timed(fn: Callable[[], object], cleanup: Callable[[], None] = lambda: None) -> float:
    cleanup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_rounds(contenders: list[Callable[[], object]], rounds: int,
                       cleanup: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds of every contender in every round, the contenders taking turns in each round,
    so that a slow minute on a shared machine slows all of them, not just one."""
    return [[timed(fn, cleanup) for fn in contenders] for _ in range(max(1, rounds))]


@dataclass(frozen=True)
class ProcessRun:
    wall: float  # seconds
    cpu: float   # user + system seconds of the process and its children


def run_process(cmd: list[str], cleanup: Callable[[], None] = lambda: None) -> ProcessRun:
    """One whole process, output discarded; a failure stops the benchmark with its stderr."""
    cleanup()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return ProcessRun(wall, cpu)


def process_rounds(commands: dict[str, list[str]], rounds: int,
                   outputs: dict[str, Path] | None = None) -> dict[str, list[ProcessRun]]:
    """Every command once per round, in turn, for `rounds` rounds; a command's output folder
    (`outputs`) is removed before each of its runs, and the last round's is kept."""
    runs: dict[str, list[ProcessRun]] = {name: [] for name in commands}
    outputs = outputs or {}
    for _ in range(max(1, rounds)):
        for name, cmd in commands.items():
            out = outputs.get(name)
            runs[name].append(run_process(
                cmd, (lambda o=out: shutil.rmtree(o, ignore_errors=True)) if out else
                (lambda: None)))
    return runs


def describe_runs(what: str, runs: dict[str, list[ProcessRun]], base: str | None) -> None:
    """Best and median wall, median CPU per command; ratios of `base` (Caffe) to the others."""
    best = {name: min(r.wall for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        med = statistics.median(r.wall for r in rs)
        cpu = statistics.median(r.cpu for r in rs)
        ratio = ""
        if base is not None and name != base:
            ratio = (f"   vs {base}: {best[base] / best[name]:.2f}x (best wall), "
                     f"{statistics.median(r.cpu for r in runs[base]) / cpu:.2f}x (CPU)")
        print(f"{what:9} {name:34} best {best[name]:6.3f} s  median {med:6.3f} s  "
              f"CPU {cpu:6.3f} s{ratio}", flush=True)


def imagenet_command() -> list[str]:
    """The `imagenet` console script beside this Python (what a user types), else -m."""
    script = Path(sys.executable).with_name("imagenet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def caffe_tools() -> dict[str, Path] | None:
    """CAFFE_BIN's convert_imageset and compute_image_mean, or None (with the reason printed)."""
    folder = os.environ.get(CAFFE_BIN_ENV)
    if not folder:
        print(f"# {CAFFE_BIN_ENV} not set: Caffe's own tools are not timed")
        return None
    tools = {name: Path(folder) / name for name in CAFFE_TOOLS}
    for name, path in list(tools.items()):
        if not path.exists():  # Caffe's CMake build names them <tool>.bin
            alt = path.with_name(name + ".bin")
            tools[name] = alt if alt.exists() else path
    missing = [str(p) for p in tools.values() if not os.access(p, os.X_OK)]
    if missing:
        raise SystemExit(f"{CAFFE_BIN_ENV}={folder}: no executable {', '.join(missing)} "
                         f"(point it at a Caffe build's build/tools folder)")
    return tools


def repeat_records(source: Path, target: Path, count: int) -> None:
    """`count` records: the source's, repeated under new keys (raw copies, no re-encoding)."""
    env = lmdb.open(str(source), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            values = [bytes(v) for _, v in txn.cursor()]
    finally:
        env.close()
    with LmdbWriter(target) as writer:
        for i in range(count):
            writer.put(f"{i:08d}_repeat".encode(), values[i % len(values)])


def same_records(a: Path, b: Path) -> bool:
    envs = [lmdb.open(str(p), readonly=True, lock=False) for p in (a, b)]
    try:
        with envs[0].begin() as ta, envs[1].begin() as tb:
            return list(ta.cursor()) == list(tb.cursor())
    finally:
        for env in envs:
            env.close()


def compile_bytecode() -> None:
    """The project's modules compiled to __pycache__ (git-ignored), as a user's first run or
    pip's install leaves them: where PYTHONDONTWRITEBYTECODE is set (this project's sandboxes
    set it), every process would otherwise compile data/, flows/ ... from source again, ~40 ms
    of a 0.2 s compute-image-mean (measured 2026-12-01: imports 141-146 vs 99-102 ms CPU)."""
    import compileall

    for package in PROJECT_PACKAGES:
        compileall.compile_dir(str(common.REPO / package), quiet=1)
    print(f"# project bytecode compiled into __pycache__ (PYTHONDONTWRITEBYTECODE="
          f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r} would not write it)")


def whole_processes(root: Path, listfile: Path, work: Path, n: int,
                    args: argparse.Namespace) -> None:
    """convert-imageset and compute-image-mean as whole processes, ours and Caffe's."""
    compile_bytecode()
    tools = caffe_tools()
    ours = imagenet_command()
    resize = [f"--resize_height={args.resize}", f"--resize_width={args.resize}"]
    dbs = {"ours": work / "proc_ours_db", "caffe": work / "proc_caffe_db"}
    commands = {"imagenet convert-imageset": [*ours, "convert-imageset", *resize,
                                              f"{root}/", str(listfile), str(dbs["ours"])]}
    if tools:
        commands["caffe convert_imageset"] = [str(tools["convert_imageset"]), *resize,
                                              f"{root}/", str(listfile), str(dbs["caffe"])]
    runs = process_rounds(commands, args.process_rounds,
                          {"imagenet convert-imageset": dbs["ours"],
                           "caffe convert_imageset": dbs["caffe"]})
    # The last round's databases are left in place: compared, then the mean's input.
    describe_runs("convert", runs, "caffe convert_imageset" if tools else None)
    if tools:
        print(f"convert   records byte-identical to Caffe's: "
              f"{same_records(dbs['ours'], dbs['caffe'])}")
    for count in args.mean_records:
        db = dbs["ours"]
        if count != n:
            db = work / f"proc_db_{count}"
            repeat_records(dbs["ours"], db, count)
        (db / "data.mdb").read_bytes()  # into the page cache, like the first contender's run
        outs = {"ours": work / "mean_ours.binaryproto", "caffe": work / "mean_caffe.binaryproto"}
        commands = {f"imagenet compute-image-mean ({count})":
                    [*ours, "compute-image-mean", str(db), str(outs["ours"])]}
        caffe_name = f"caffe compute_image_mean ({count})"
        if tools:
            commands[caffe_name] = [str(tools["compute_image_mean"]), str(db),
                                    str(outs["caffe"])]
        runs = process_rounds(commands, args.process_rounds)
        describe_runs("mean", runs, caffe_name if tools else None)
        if tools:
            same = outs["ours"].read_bytes() == outs["caffe"].read_bytes()
            print(f"mean      {count} records: mean files byte-identical: {same}")
        if db != dbs["ours"]:
            shutil.rmtree(db, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="folder of JPEGs (default: generate)")
    parser.add_argument("--count", type=int, default=1000, help="images to generate")
    parser.add_argument("--resize", type=int, default=256, help="resize to SIZE x SIZE")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best is kept)")
    parser.add_argument("--mean-rounds", type=int, default=9,
                        help="rounds of naive-then-ours mean runs (best of each is kept)")
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="'all cores' worker count")
    parser.add_argument("--pool", default="thread", choices=["process", "thread"],
                        help="how convert_imageset runs its workers")
    parser.add_argument("--process-rounds", type=int, default=5,
                        help="rounds of the whole-process comparisons (0: skip them)")
    parser.add_argument("--mean-records", default="1000,10000",
                        help="record counts of the whole-process mean comparison")
    args = parser.parse_args()
    args.mean_records = [int(v) for v in args.mean_records.split(",") if v.strip()]
    print(common.header("benchmarks/convert.py"), flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        root = args.folder
        if root is None:
            root = work / "images"
            root.mkdir()
            start = time.perf_counter()
            generate(root, args.count)
            print(f"generated {args.count} JPEGs in {time.perf_counter() - start:.1f} s "
                  f"into {root}")
        listfile = work / "list.txt"
        n = write_listing(root, listfile)
        nbytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"{n} images, {nbytes / n / 1024:.0f} KB on average; {available_cores()} cores; "
              f"resize {args.resize}x{args.resize}; conversion: best of {args.repeat} rounds, "
              f"mean: best of {args.mean_rounds}")
        for p in root.rglob("*"):  # warm the page cache so the first contender is not penalised
            if p.is_file():
                p.read_bytes()
        db = work / "db"

        def clean() -> None:
            shutil.rmtree(db, ignore_errors=True)

        # The command line's path (no content digest: it prints none), then the library
        # default that also hashes every record for the pipeline's cache key.
        runs = [(w, False) for w in sorted({1, args.workers})] + [(args.workers, True)]
        contenders = [lambda: naive_convert(root, listfile, db, args.resize)] + [
            lambda w=w, d=d: convert_imageset(
                root, listfile, db, resize_height=args.resize, resize_width=args.resize,
                workers=w, pool=args.pool, digest=d, show_progress=False)
            for w, d in runs]
        best = [min(col) for col in zip(*interleaved_rounds(contenders, args.repeat, clean))]
        base = best[0]
        print(f"convert  naive baseline (1 process):  {n / base:8.1f} img/s   1.00x")
        for (workers, digest), t in zip(runs, best[1:]):
            what = f"--workers={workers} ({args.pool}){' + digest' if digest else ''}:"
            print(f"convert  imagenet {what:26s} {n / t:8.1f} img/s   {base / t:.2f}x")

        record_bytes = 3 * args.resize * args.resize
        rounds = interleaved_rounds([lambda: naive_mean(db),
                                     lambda: compute_image_mean(db, show_progress=False)],
                                    args.mean_rounds)
        base, t = min(r[0] for r in rounds), min(r[1] for r in rounds)
        print(f"mean     naive per-record loop:       {n / base:8.1f} rec/s   1.00x   "
              f"({n * record_bytes / base / 1e6:.0f} MB/s)")
        print(f"mean     imagenet compute-image-mean: {n / t:8.1f} rec/s   {base / t:.2f}x   "
              f"({n * record_bytes / t / 1e6:.0f} MB/s)")
        ratios = sorted(naive / ours for naive, ours in rounds)
        print(f"mean     per-round ratio over {len(rounds)} rounds: lowest {ratios[0]:.2f}x, "
              f"median {ratios[len(ratios) // 2]:.2f}x, highest {ratios[-1]:.2f}x")
        if args.process_rounds > 0:
            whole_processes(root, listfile, work, n, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
