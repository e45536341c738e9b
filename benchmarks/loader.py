"""Input pipeline throughput: images/s that data/pipeline.py delivers from an LMDB to
device-ready batches, per worker count, for raw and JPEG-encoded Datums, beside the training
step rate.

Usage: python benchmarks/loader.py [--batch-size 32] [--workers 1,2] [--batches 20]
       [--records N] [--device cpu|gpu] [--kinds raw,encoded] [--train-img-s X | --train-json F]

One pass = `--batches` batches of the bvlc_alexnet TRAIN Data layer (crop 227, mirror, mean
file) through the trainer's own input path, model/feed.py's DeviceFeed: a Prefetcher (depth
max(3, 2 x workers)) decoding on `workers` threads, each batch stacked and put on the device on
the feed's thread, two batches ahead; the pass ends with block_until_ready on the last. The LMDB is built in a temp
dir and page-cached (warm reads: what a long training run sees once the OS caches the DB, or a
fast NVMe). The last line reads `loader img/s: raw X, encoded Y (workers W), train Z, loader /
train R` where W is the largest worker count, Z the training rate given (`n/a` when none) and R
the slower kind's rate over Z (the aim on an accelerator: >= 1.5).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KINDS = ("raw", "encoded")
MIN_PREFETCH = 3


def loader_rate(data: common.BenchData, batch_size: int, workers: int, batches: int,
                device) -> float:
    """Images/s from a cold Prefetcher start to `batches` device-ready batches."""
    import jax

    from data.pipeline import DataSource
    from model.feed import DeviceFeed, FedNet
    from model.prototxt import filter_net

    net_param = filter_net(common.alexnet_train_net(data, batch_size), "TRAIN")
    (lp,) = [lp for lp in net_param.layer if lp.type == "Data"]
    src = DataSource(lp, train=True, seed=0, root=common.REPO)
    fed = FedNet(net=None, sources={lp.name: src}, means={}, loss_weight={})  # type: ignore[arg-type]
    src.batch(0)  # open the reader and the page cache outside the timed window
    t0 = time.perf_counter()
    feed = DeviceFeed(fed, 0, 1, lambda stacked: jax.device_put(stacked, device),
                      prefetch=max(MIN_PREFETCH, 2 * workers), workers=workers)
    try:
        for _ in range(batches):
            arrays, _, _ = feed.next()
        jax.block_until_ready(arrays)
        seconds = time.perf_counter() - t0
    finally:
        feed.close()
        src.close()
    return batches * batch_size / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20, help="batches per measurement")
    p.add_argument("--records", type=int, default=0, help="LMDB records (default 4 batches)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--train-img-s", type=float, default=None,
                   help="training rate to print beside (e.g. from benchmarks/train.py)")
    p.add_argument("--train-json", type=Path, default=None,
                   help="benchmarks/train.py --json output to take the training rate from")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not workers or min(workers) < 1:
        p.error(f"--kinds from {KINDS} and positive --workers, got {kinds} / {workers}")
    train_rate = args.train_img_s
    if train_rate is None and args.train_json and args.train_json.exists():
        train_rate = json.loads(args.train_json.read_text())["ours"]["img_per_s"]

    import jax

    device = jax.devices(args.device)[0]
    records = args.records or 4 * args.batch_size
    best: dict[str, float] = {}
    print(f"# input pipeline -> {device.platform} batches of {args.batch_size}, {records} "
          f"page-cached records, {args.batches} batches per row")
    print(f"{'kind':8} {'workers':>7} {'img/s':>9}")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for kind in kinds:
            data = common.build_lmdb(Path(tmp), records, encoded=(kind == "encoded"))
            for w in workers:
                rate = loader_rate(data, args.batch_size, w, args.batches, device)
                print(f"{kind:8} {w:7d} {rate:9.1f}", flush=True)
                if w == max(workers):
                    best[kind] = rate
    parts = [f"{k} {best[k]:.1f}" for k in kinds]
    train = f"{train_rate:.1f}" if train_rate else "n/a"
    ratio = f"{min(best.values()) / train_rate:.2f}" if train_rate else "n/a"
    print(f"loader img/s: {', '.join(parts)} (workers {max(workers)}), train {train}, "
          f"loader / train {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
