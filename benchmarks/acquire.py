"""Throughput of the ILSVRC12 acquisition stage on the default mini-ILSVRC12 (10 classes x 100
train + 200 val, ~37 MB): download from a local HTTP server (127.0.0.1, stdlib
ThreadingHTTPServer) and extraction, each against a baseline run in the same process.

- download: data.download.download (httpx, md5 computed while the bytes arrive, temp name,
  rename) vs bare read-into-a-file loops of the same URL (no checksum, no resume): one with
  httpx (the ratio is the cost of verification and bookkeeping) and one with urllib (what
  data/download.py used before httpx: the transport's own difference).
- extraction: data.extract.extract_train + extract_val (streamed, checked, temp+rename per
  file, per-synset markers) vs tarfile's own extractall (outer tar to disk, then each inner tar,
  filter="data"), which needs the train archive's size twice on disk.
Run: .venv/bin/python benchmarks/acquire.py [--reps 5] [--workdir /tmp]
MB = 2**20 bytes; medians over --reps; wall time (the machine is shared: quote ranges).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import common  # noqa: E402  (benchmarks/common.py: the CPU header)
import httpx  # noqa: E402  (imported here: data.download imports it lazily, 0.5 s, untimed)
from data import ilsvrc12  # noqa: E402
from data.download import download  # noqa: E402
from data.extract import extract_train, extract_val  # noqa: E402
from data.mini import make_mini_ilsvrc12  # noqa: E402

MB = 2**20
ARCHIVES = (ilsvrc12.TRAIN_ARCHIVE, ilsvrc12.VAL_ARCHIVE)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the benchmark's output to its results
        pass


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def bare_download(url: str, dest: Path) -> int:
    with urllib.request.urlopen(url) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    return dest.stat().st_size


def bare_httpx_download(url: str, dest: Path) -> int:
    with httpx.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r, \
            open(dest, "wb") as f:
        for chunk in r.iter_raw():
            f.write(chunk)
    return dest.stat().st_size


def naive_extract(train: Path, val: Path, root: Path) -> int:
    (root / "tars").mkdir(parents=True)
    with tarfile.open(train) as t:
        t.extractall(root / "tars", filter="data")
    for inner in sorted((root / "tars").iterdir()):
        with tarfile.open(inner) as t:
            t.extractall(root / "train" / inner.stem, filter="data")
    with tarfile.open(val) as t:
        t.extractall(root / "val", filter="data")
    return sum(p.stat().st_size for p in (root / "train").rglob("*") if p.is_file()) + sum(
        p.stat().st_size for p in (root / "val").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    print(common.header("benchmarks/acquire.py", ("httpx",)), flush=True)
    base = Path(tempfile.mkdtemp(prefix="acquire-bench-", dir=args.workdir))
    try:
        t = time.monotonic()
        mini = make_mini_ilsvrc12(base / "mirror")
        print(f"mini-ILSVRC12 (default size) generated in {time.monotonic() - t:.1f} s")
        sums = ilsvrc12.parse_md5sums(mini.md5sums.read_text(), "MD5SUMS")
        server = serve(base / "mirror")
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        rows: dict[str, list[float]] = {k: [] for k in ("dl", "dl_base", "dl_httpx", "ex",
                                                         "ex_base")}
        for rep in range(args.reps):
            work = base / f"rep{rep}"
            t = time.monotonic()
            n = sum(download(url + a, work / "dl", md5=sums[a]).bytes for a in ARCHIVES)
            rows["dl"].append(n / MB / (time.monotonic() - t))
            (work / "bare").mkdir(parents=True)
            t = time.monotonic()
            n = sum(bare_download(url + a, work / "bare" / a) for a in ARCHIVES)
            rows["dl_base"].append(n / MB / (time.monotonic() - t))
            (work / "bare_httpx").mkdir(parents=True)
            t = time.monotonic()
            n = sum(bare_httpx_download(url + a, work / "bare_httpx" / a) for a in ARCHIVES)
            rows["dl_httpx"].append(n / MB / (time.monotonic() - t))
            t = time.monotonic()
            a = extract_train(work / "dl" / ARCHIVES[0], work / "root")
            b = extract_val(work / "dl" / ARCHIVES[1], work / "root")
            rows["ex"].append((a.bytes + b.bytes) / MB / (time.monotonic() - t))
            t = time.monotonic()
            n = naive_extract(work / "dl" / ARCHIVES[0], work / "dl" / ARCHIVES[1], work / "naive")
            rows["ex_base"].append(n / MB / (time.monotonic() - t))
            shutil.rmtree(work)
        server.shutdown()
        med = {k: statistics.median(v) for k, v in rows.items()}
        rng = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in rows.items()}
        print(f"download (md5-verified, resumable): {med['dl']:.0f} MB/s (range {rng['dl']}); "
              f"bare httpx copy {med['dl_httpx']:.0f} MB/s (range {rng['dl_httpx']}), ratio "
              f"{med['dl'] / med['dl_httpx']:.2f}; bare urllib copy {med['dl_base']:.0f} MB/s "
              f"(range {rng['dl_base']}), ratio {med['dl'] / med['dl_base']:.2f}")
        print(f"extraction (train+val, {a.files + b.files} files): {med['ex']:.0f} MB/s (range "
              f"{rng['ex']}); tarfile.extractall {med['ex_base']:.0f} MB/s; ratio "
              f"{med['ex'] / med['ex_base']:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
