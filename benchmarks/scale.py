"""The real job's size: the data stages (and a few bvlc_alexnet iterations at batch 256) on
synthetic ILSVRC2012 sets of the real shape at two or more sizes, and what they project to for
the full 1.28 M + 50 k images on 2 and 16 cores.

    python benchmarks/scale.py --quick          # 2 small sizes (2x apart), < 10 min on 2 cores
    python benchmarks/scale.py                  # 12,000 and 45,000 images (~25 min on 2 cores)
    python benchmarks/scale.py --sizes 10x2,40x5 --iterations 2 --work /big/disk/scale

Each size: `make-mini-ilsvrc12 --classes 1000 --profile ilsvrc` (all 1000 WNIDs, the real tar
of tars, ~110 KB and ~200k-pixel JPEGs; generation is timed but is not a stage), then the
`imagenet` flow one stage at a time in one child process (one ephemeral Prefect server, as
`imagenet pipeline` runs them): download (archives given as local paths: the md5 check of
each, in place; the network is the user's link and not measured), extract, listings,
convert, mean, train. A thread samples /proc/self/status: per stage the peak anonymous RSS
(the process's own memory) and the peak file-backed RSS (mapped LMDB pages, reclaimable).

Components, measured in this process with the contenders taking turns round after round (the
machine is shared: best of the rounds, spread printed):
- writer: records/s of LmdbWriter alone (256x256x3 raw Datums, digest hashes computed in
  advance as the converting workers do) against the plain Caffe-style loop (put, commit every
  1000) on the same disk;
- convert: whole-conversion records/s (and CPU ms per image) of the largest size's train
  listing for 1..N workers;
- extract: MiB/s of the largest size's train archive for 1..N workers, onto the disk and into
  memory (where it fits);
- mean read: compute_image_mean over the largest train LMDB (the mean stage's path for a
  foreign LMDB), with how far anonymous and mapped RSS rise against the LMDB's size.

Projection (printed with its inputs): each stage's seconds are fitted as a + b * images over
the sizes (2 cores, as measured). For 16 cores, convert runs at min(16 cores / the measured CPU
time per image of the whole conversion, the writer's ceiling measured in memory), and says the
disk rate that needs; extraction at min(16 x its 1-worker MiB/s, the disk write rate measured
here); the mean from the sums takes what it took here; listings stay one thread. CPU time per
image rather than wall-clock scaling, because this 2-core machine is shared: wall-clock ratios
between worker counts move with the neighbours' load, CPU seconds much less. Download and
training are not projected (the network link; the accelerator).

The last line: `scale: images xR, time xT, process memory xM` between the smallest and the
largest size (time: the data stages' seconds; memory: their peak anonymous RSS; training's,
~10 GB of XLA buffers at batch 256, is in the table and does not depend on the set's size).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeriodicSampler, disk_bytes, header  # noqa: E402  (benchmarks/common.py)

from data import ilsvrc12  # noqa: E402

# The real ILSVRC2012 (CAFFE_FACTS.md).
FULL_TRAIN, FULL_VAL = 1_281_167, 50_000
FULL_TRAIN_TAR_BYTES = 147_897_477_120
CLASSES = ilsvrc12.ILSVRC2012_CLASSES
ALEXNET_SOLVER = REPO / "model" / "zoo" / "bvlc_alexnet" / "solver.prototxt"
ALEXNET_TRAIN_VAL = REPO / "model" / "zoo" / "bvlc_alexnet" / "train_val.prototxt"
# Sizes as train-per-class x val-per-class over all 1000 classes.
DEFAULT_SIZES = "10x2,40x5"  # 12,000 and 45,000 images, as the runs
QUICK_SIZES = "2x1,6x1"  # 3,000 and 7,000 images: > 2x apart, < 10 min on 2 cores
STAGES = ("download", "extract", "listings", "convert", "mean", "train")
DATA_STAGES = STAGES[:-1]
PROJECTED_CORES = (2, 16)
MEMORY_SAMPLE_S = 0.1
MIB = 2**20
# Writer benchmark: raw 256x256 BGR records, like the pipeline's.
RECORD_CHW = (3, 256, 256)
DISTINCT_RECORDS = 64  # distinct values cycled through (building each costs more than writing)
CAFFE_COMMIT_EVERY = 1000
NAIVE_MAP_SIZE = 1 << 40
RECORD_BYTES = 196_624 + 4096  # one 256x256x3 record in the LMDB, with its page rounding
SHM = "/dev/shm"  # memory-backed filesystem for the writer's ceiling (skipped where absent)
SHM_HEADROOM = 4  # use it only with this many times the data free (it is RAM)


# ----------------------------------------------------------------------------- machine info

def _status_kib(fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in fields:
            out[name] = int(line.split()[1])
    return out


# ----------------------------------------------------------------------------- the child

class MemorySampler(PeriodicSampler):
    """Peak anonymous and file-backed RSS of this process while a stage runs."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self) -> None:
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        super().__init__(MEMORY_SAMPLE_S)

    def sample(self) -> None:
        for name, kib in _status_kib(self.FIELDS).items():
            self.peaks[name] = max(self.peaks[name], kib)


def bench_solver(folder: Path) -> Path:
    """bvlc_alexnet's solver, minus the test at iteration 0 (1000 test batches)."""
    text = ALEXNET_SOLVER.read_text().replace(
        'net: "model/zoo/bvlc_alexnet/train_val.prototxt"', f'net: "{ALEXNET_TRAIN_VAL}"')
    path = folder / "solver.prototxt"
    path.write_text(text + "test_initialization: false\n")
    return path


def child(spec_path: Path) -> None:
    """Run the flow stage by stage for one size; write per-stage figures to spec['out']."""
    spec = json.loads(spec_path.read_text())
    from flows import prefect_env

    prefect_env.configure(PREFECT_HOME=spec["prefect_home"])
    from flows.imagenet import PipelineParams, Sources, imagenet

    mirror, root = Path(spec["mirror"]), Path(spec["data_root"])
    sources = Sources(train=str(mirror / ilsvrc12.TRAIN_ARCHIVE),
                      val=str(mirror / ilsvrc12.VAL_ARCHIVE),
                      aux=str(mirror / ilsvrc12.AUX_ARCHIVE), checksums=str(mirror / "MD5SUMS"))
    rows = []
    for stage in spec["stages"]:
        params = PipelineParams(sources=sources, data_root=str(root), stages=[stage],
                                solver=spec["solver"], max_iter=spec["iterations"] or None,
                                snapshot_interval=spec["iterations"] or None)
        started = time.monotonic()
        with MemorySampler() as memory:
            result = imagenet(**params.flow_parameters())
        wall = time.monotonic() - started
        if not isinstance(result, dict):  # a Failed state: the stage's one line is in the log
            raise SystemExit(f"stage {stage} failed: {result}")
        for row in result["stages"]:
            rows.append({"stage": stage, "task": row["stage"], "status": row["status"],
                         "work_s": float(row["work (s)"]), "throughput": row["throughput"],
                         "wall_s": wall, "anon_mib": memory.peaks["RssAnon"] / 1024,
                         "file_mib": memory.peaks["RssFile"] / 1024,
                         "disk_gib": disk_bytes(root) / 2**30,
                         "record": result["records"].get(row["stage"], {})})
        print(f"  {stage}: {wall:.1f} s, peak anonymous RSS "
              f"{memory.peaks['RssAnon'] / 1024:,.0f} MiB, file-backed "
              f"{memory.peaks['RssFile'] / 1024:,.0f} MiB", flush=True)
    Path(spec["out"]).write_text(json.dumps(rows, default=str))


# ----------------------------------------------------------------------------- the sizes

def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        train, _, val = part.strip().partition("x")
        sizes.append((int(train), int(val or 1)))
    return sizes


def run_size(work: Path, train_per_class: int, val_per_class: int, stages: list[str],
             iterations: int) -> dict:
    from data.mini import make_mini_ilsvrc12

    label = f"{CLASSES * train_per_class:,} + {CLASSES * val_per_class:,}"
    folder = work / f"size-{train_per_class}x{val_per_class}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.monotonic()
    mini = make_mini_ilsvrc12(folder / "mirror", classes=CLASSES,
                              train_per_class=train_per_class, val_per_class=val_per_class,
                              profile="ilsvrc")
    generated = time.monotonic() - started
    tar_bytes = mini.train_tar.stat().st_size
    print(f"size {label}: generated in {generated:.1f} s (train tar {tar_bytes / 2**30:.2f} GiB, "
          f"{tar_bytes / mini.train_images / 1000:.0f} KB per image)", flush=True)
    spec = {"mirror": str(folder / "mirror"), "data_root": str(folder / "data"),
            "prefect_home": str(work / "prefect-home"), "stages": stages,
            "solver": str(bench_solver(folder)), "iterations": iterations,
            "out": str(folder / "rows.json")}
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--child", str(spec_path)], check=True, cwd=REPO)
    rows = json.loads((folder / "rows.json").read_text())
    return {"train": mini.train_images, "val": mini.val_images, "label": label,
            "folder": str(folder), "train_tar": str(mini.train_tar), "tar_bytes": tar_bytes,
            "generated_s": generated, "rows": rows}


# ----------------------------------------------------------------------------- components

def _best(values: list[float]) -> str:
    return f"{max(values):,.0f} (rounds {', '.join(f'{v:,.0f}' for v in values)})"


def bench_writer(work: Path, records: int, rounds: int) -> dict:
    """Writer alone: records/s, naive Caffe-style loop vs LmdbWriter, interleaved; on the work
    disk (what this machine's disk allows) and in memory (/dev/shm: the writer's own ceiling,
    what a faster disk would see)."""
    import lmdb
    import numpy as np

    from data.datum import encode_datum_bytes
    from data.lmdb_io import LmdbWriter, value_hash

    rng = np.random.default_rng(0)
    values = [encode_datum_bytes(rng.integers(0, 256, RECORD_CHW, dtype=np.uint8), i)
              for i in range(DISTINCT_RECORDS)]
    hashes = [value_hash(v) for v in values]
    keys = [f"{i:08d}_n{i % CLASSES:08d}/n{i % CLASSES:08d}_{i}.JPEG".encode()
            for i in range(records)]

    def naive(folder: Path) -> float:
        path = folder / "naive"
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        env = lmdb.open(str(path), map_size=NAIVE_MAP_SIZE, sync=False, metasync=False)
        txn = env.begin(write=True)
        for i, key in enumerate(keys):
            txn.put(key, values[i % DISTINCT_RECORDS])
            if (i + 1) % CAFFE_COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.sync(True)
        env.close()
        shutil.rmtree(path, ignore_errors=True)
        return records / (time.perf_counter() - start)

    def ours(folder: Path) -> float:
        start, cpu = time.perf_counter(), _cpu_seconds()
        with LmdbWriter(folder / "ours", overwrite=True, digest=True) as writer:
            for i, key in enumerate(keys):
                writer.put(key, values[i % DISTINCT_RECORDS], hashes[i % DISTINCT_RECORDS])
        seconds = time.perf_counter() - start
        cpu_ms.append((_cpu_seconds() - cpu) * 1e3 / records)
        shutil.rmtree(folder / "ours", ignore_errors=True)
        return records / seconds

    places = {"disk": work / "writer"}
    shm = Path(SHM)
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * records * len(values[0]):
        places["memory"] = Path(tempfile.mkdtemp(dir=shm, prefix="scale-writer-"))
    out: dict = {}
    mb = len(values[0]) / 1e6
    for place, folder in places.items():
        folder.mkdir(parents=True, exist_ok=True)
        results: dict[str, list[float]] = {"naive": [], "ours": []}
        cpu_ms: list[float] = []
        try:
            for _ in range(rounds):
                results["naive"].append(naive(folder))
                results["ours"].append(ours(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        best = {k: max(v) for k, v in results.items()}
        print(f"writer alone ({place}: {folder}), {records:,} records of {len(values[0]):,} B, "
              f"best of {rounds}: naive {_best(results['naive'])} rec/s; LmdbWriter "
              f"{_best(results['ours'])} rec/s ({best['ours'] * mb:,.0f} MB/s); ratio "
              f"{best['ours'] / best['naive']:.2f}x; LmdbWriter CPU {min(cpu_ms):.3f} ms per "
              f"record (all its threads)", flush=True)
        out[place] = {"naive": best["naive"], "ours": best["ours"],
                      "ours_mb_s": best["ours"] * mb, "rounds": results,
                      "cpu_ms": min(cpu_ms)}
    return out


def bench_convert(work: Path, size: dict, images: int, workers: list[int], rounds: int) -> dict:
    """Whole conversion records/s per worker count on the first `images` of a size's train
    listing (its extracted tree), interleaved."""
    from data.convert import convert_imageset

    data = Path(size["folder"]) / "data"
    listing = work / "convert-listing.txt"
    lines = (data / ilsvrc12.TRAIN_LIST).read_text().splitlines()[:images]
    listing.write_text("\n".join(lines) + "\n")
    results: dict[int, list[float]] = {w: [] for w in workers}
    cpu_ms: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            out = work / f"convert-{w}"
            cpu = _cpu_seconds()
            result = convert_imageset(str(data / ilsvrc12.TRAIN_DIR) + "/", listing, out,
                                      resize_height=256, resize_width=256, workers=w,
                                      overwrite=True, pixel_sum=True, show_progress=False)
            cpu_ms[w].append((_cpu_seconds() - cpu) * 1e3 / result.count)
            results[w].append(result.count / result.seconds)
            shutil.rmtree(out, ignore_errors=True)
    best = {w: max(v) for w, v in results.items()}
    for w in workers:
        print(f"convert, {len(lines):,} images, {w} worker(s): {_best(results[w])} rec/s "
              f"(x{best[w] / best[workers[0]]:.2f} of 1 worker); CPU {min(cpu_ms[w]):.2f} ms "
              "per image", flush=True)
    return {"best": best, "rounds": results, "cpu_ms": min(min(v) for v in cpu_ms.values())}


def bench_extract(work: Path, size: dict, workers: list[int], rounds: int) -> dict:
    """Train-archive extraction MiB/s per worker count, interleaved, onto the work disk and
    into memory (/dev/shm, where it fits: the extractor's own rate, what a faster disk would
    see). The archive is in the page cache after the first round for all of them."""
    from data.extract import extract_train

    tar = Path(size["train_tar"])
    places = {"disk": work / "extract"}
    shm = Path(SHM)
    if shm.is_dir() and shutil.disk_usage(shm).free > SHM_HEADROOM * tar.stat().st_size:
        places["memory"] = Path(tempfile.mkdtemp(dir=shm, prefix="scale-extract-"))
    out: dict = {}
    for place, folder in places.items():
        results: dict[int, list[float]] = {w: [] for w in workers}
        try:
            for _ in range(rounds):
                for w in workers:
                    dest = folder / f"extract-{w}"
                    shutil.rmtree(dest, ignore_errors=True)
                    result = extract_train(tar, dest, workers=w)
                    results[w].append(result.bytes / MIB / result.seconds)
                    shutil.rmtree(dest, ignore_errors=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        best = {w: max(v) for w, v in results.items()}
        for w in workers:
            print(f"extract ({place}), {tar.stat().st_size / 2**30:.2f} GiB train tar, {w} "
                  f"worker(s): {_best(results[w])} MiB/s (x{best[w] / best[workers[0]]:.2f} of "
                  "1 worker)", flush=True)
        out[place] = {"best": best, "rounds": results}
    return out


def bench_mean_read(size: dict) -> dict:
    """compute_image_mean reading a size's train LMDB (what the mean stage does for a foreign
    LMDB): rec/s, and how far anonymous and file-backed RSS rose over where they started,
    against the LMDB's size (the pages it passed are released as it goes)."""
    from data.mean import compute_image_mean

    db = Path(size["folder"]) / "data" / "lmdb" / "ilsvrc12_train_lmdb"
    db_mib = (db / "data.mdb").stat().st_size / MIB
    before = _status_kib(MemorySampler.FIELDS)
    with MemorySampler() as memory:
        result = compute_image_mean(db, show_progress=False)
    rise = {k: (memory.peaks[k] - before[k]) / 1024 for k in MemorySampler.FIELDS}
    print(f"compute_image_mean over the {size['label']} train LMDB ({db_mib:,.0f} MiB): "
          f"{result.count / result.seconds:,.0f} rec/s; RSS rose by {rise['RssAnon']:,.0f} MiB "
          f"anonymous, {rise['RssFile']:,.0f} MiB file-backed (mapped)", flush=True)
    return {"db_mib": db_mib, "anon_rise_mib": rise["RssAnon"],
            "file_rise_mib": rise["RssFile"]}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (less disturbed by other
    processes on the machine than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- report

def stage_rows(size: dict) -> dict[str, dict]:
    """Per pipeline stage: summed work seconds of its tasks, their throughputs, the peaks."""
    out: dict[str, dict] = {}
    for row in size["rows"]:
        s = out.setdefault(row["stage"], {"seconds": 0.0, "throughput": [], "anon": 0.0,
                                          "file": 0.0, "disk": 0.0, "wall": row["wall_s"],
                                          "records": []})
        s["seconds"] += row["work_s"]
        s["throughput"].append(f"{row['task']} {row['throughput']}")
        s["anon"] = max(s["anon"], row["anon_mib"])
        s["file"] = max(s["file"], row["file_mib"])
        s["disk"] = row["disk_gib"]
        s["records"].append(row["record"])
    return out


def print_table(sizes: list[dict]) -> None:
    header = (f"{'images':>16}  {'stage':<9} {'work s':>8} {'wall s':>7} {'anon RSS':>9} "
              f"{'mapped':>8} {'disk GiB':>8}  throughput")
    print("\n" + header + "\n" + "-" * len(header))
    for size in sizes:
        for stage, s in stage_rows(size).items():
            print(f"{size['label']:>16}  {stage:<9} {s['seconds']:8.1f} {s['wall']:7.1f} "
                  f"{s['anon']:7,.0f}Mi {s['file']:6,.0f}Mi {s['disk']:8.2f}  "
                  f"{'; '.join(s['throughput'])}")


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a + b * x (a line through two points)."""
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def project(sizes: list[dict], components: dict) -> None:
    """Full-size seconds per data stage on 2 and 16 cores (module docstring)."""
    n_full = FULL_TRAIN + FULL_VAL
    per_stage = {stage: [] for stage in DATA_STAGES}
    for size in sizes:
        rows = stage_rows(size)
        for stage in DATA_STAGES:
            if stage in rows:
                per_stage[stage].append((size["train"] + size["val"], rows[stage]["seconds"]))
    two: dict[str, float] = {}
    print(f"\nprojection to {FULL_TRAIN:,} + {FULL_VAL:,} images "
          f"({FULL_TRAIN_TAR_BYTES / 1e9:.1f} GB train tar), fitted a + b * images:")
    for stage, points in per_stage.items():
        if not points:
            continue
        a, b = fit(points)
        two[stage] = max(0.0, a + b * n_full)
        print(f"  {stage:<9} a = {a:6.1f} s, b = {b * 1e3:7.3f} ms/image -> 2 cores "
              f"{two[stage] / 60:6.1f} min")
    sixteen, two_by_cpu = dict(two), dict(two)
    conv, ext, writer = (components.get(k) for k in ("convert", "extract", "writer"))
    notes = []
    if conv and writer and two.get("convert", 0) > 0:
        place = writer.get("memory", writer["disk"])
        # The writer's ceiling: its wall-clock best, or one core's worth of its CPU time per
        # record where the machine was too busy for the wall clock to show it.
        ceiling = max(place["ours"], 1e3 / place["cpu_ms"])
        capacity = {cores: cores * 1e3 / conv["cpu_ms"] for cores in PROJECTED_CORES}
        cpu_basis = {cores: (FULL_TRAIN + FULL_VAL) / min(capacity[cores], ceiling)
                     for cores in PROJECTED_CORES}
        sixteen["convert"] = cpu_basis[16]
        two_by_cpu["convert"] = cpu_basis[2]
        notes.append(f"convert: {conv['cpu_ms']:.2f} CPU ms per image -> decode "
                     f"{capacity[2]:,.0f} rec/s on 2 cores, {capacity[16]:,.0f} on 16; the "
                     f"writer's ceiling {ceiling:,.0f} rec/s (wall {place['ours']:,.0f}, CPU "
                     f"{place['cpu_ms']:.3f} ms per record; the plain loop's wall "
                     f"{place['naive']:,.0f}) -> 16 cores {min(capacity[16], ceiling):,.0f} "
                     f"rec/s ({'writer-bound' if ceiling < capacity[16] else 'decode-bound'}), "
                     f"{cpu_basis[16] / 60:.1f} min, needing "
                     f"{min(capacity[16], ceiling) * RECORD_BYTES / 1e6:,.0f} MB/s of disk "
                     f"writes (this disk: {writer['disk']['ours_mb_s']:,.0f}); on 2 cores by "
                     f"CPU time {cpu_basis[2] / 60:.1f} min (the fit above is wall time at "
                     f"this machine's load)")
    if ext and writer and two.get("extract", 0) > 0:
        best = ext.get("memory", ext["disk"])["best"]
        one = best[min(best)]
        disk = writer["disk"]["ours_mb_s"] * 1e6 / MIB
        rate16 = min(16 * one, disk)
        rate2 = FULL_TRAIN_TAR_BYTES / MIB / two["extract"]
        sixteen["extract"] = two["extract"] * rate2 / rate16 if rate16 > rate2 else two["extract"]
        notes.append(f"extract: 1 worker {one:,.0f} MiB/s, {max(best)} workers "
                     f"{best[max(best)]:,.0f} MiB/s (memory-backed where measured); 16 cores "
                     f"bounded by the disk (writes measured here: {disk:,.0f} MiB/s) -> "
                     f"{rate16:,.0f} MiB/s")
    for note in notes:
        print("  " + note)
    skipped = [s for s in DATA_STAGES if s not in two]
    total2 = sum(v for k, v in two.items() if k != "download")
    total2_cpu = sum(v for k, v in two_by_cpu.items() if k != "download")
    total16 = sum(v for k, v in sixteen.items() if k != "download")
    print(f"  data stages without download: 2 cores {total2 / 60:.1f} min as measured "
          f"({total2_cpu / 60:.1f} min with convert by CPU time), 16 cores {total16 / 60:.1f} min"
          + (f" (not measured: {', '.join(skipped)})" if skipped else "")
          + "; download (md5 in place here) and training are not projected")


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer rounds")
    parser.add_argument("--sizes", default=None,
                        help=f"train x val images per class, comma-separated (default "
                             f"{DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    parser.add_argument("--iterations", type=int, default=2,
                        help="bvlc_alexnet iterations at batch 256 (0: no train stage)")
    parser.add_argument("--work", type=Path, default=REPO / ".bench-tmp" / "scale",
                        help="where the sets, trees and LMDBs go (removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards")
    parser.add_argument("--no-components", action="store_true",
                        help="skip the writer / convert / extract component benchmarks")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    sizes_text = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    sizes_spec = sorted(parse_sizes(sizes_text), key=lambda s: s[0] + s[1])
    rounds = 2 if args.quick else 3
    stages = list(STAGES if args.iterations > 0 else DATA_STAGES)
    print(header("benchmarks/scale.py"), flush=True)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        sizes = [run_size(work, t, v, stages, args.iterations) for t, v in sizes_spec]
        components: dict = {}
        if not args.no_components:
            cores = os.cpu_count() or 1
            counts = sorted({1, 2, cores} - {0}) if cores > 1 else [1]
            largest = sizes[-1]
            components["writer"] = bench_writer(work, 2_000 if args.quick else 5_000, rounds)
            components["convert"] = bench_convert(work, largest, 1_500 if args.quick else
                                                  4_000, counts, rounds)
            components["extract"] = bench_extract(work, largest, counts, rounds)
            components["mean_read"] = bench_mean_read(largest)
        print_table(sizes)
        for size in sizes:
            gen = size["generated_s"]
            print(f"{size['label']}: generating the set took {gen:.1f} s (not a stage)")
        project(sizes, components)
        print(f"\n{header('benchmarks/scale.py')}\n# whole benchmark {time.monotonic() - started:.0f} s")
        first, last = sizes[0], sizes[-1]

        def data_seconds(size: dict) -> float:
            return sum(s["seconds"] for k, s in stage_rows(size).items() if k in DATA_STAGES)

        def memory(size: dict) -> float:  # training's XLA buffers do not grow with the set
            return max(s["anon"] for k, s in stage_rows(size).items() if k in DATA_STAGES)

        n0, n1 = first["train"] + first["val"], last["train"] + last["val"]
        print(f"scale: images x{n1 / n0:.2f}, time x{data_seconds(last) / data_seconds(first):.2f}"
              f", process memory x{memory(last) / memory(first):.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
