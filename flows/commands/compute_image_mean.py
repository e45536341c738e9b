"""`imagenet compute-image-mean [--backend lmdb] INPUT_DB [OUTPUT_FILE]`: Caffe's
compute_image_mean (tools/compute_image_mean.cpp): writes mean.binaryproto and prints the
per-channel means as Caffe logs them. Logic lives in data.mean.
"""
from __future__ import annotations

import argparse

from data.errors import ImagenetError
from data.mean import ACCUMULATIONS, compute_image_mean
from flows.flags import add_flag

# Storage backends Caffe offers; only LMDB is implemented (and is Caffe's default).
BACKENDS: dict[str, bool] = {"lmdb": True, "leveldb": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_db", metavar="INPUT_DB", help="LMDB of Datums")
    parser.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?", default=None,
                        help="where to write the mean (.binaryproto); omitted: only print it")
    add_flag(parser, "backend", default="lmdb", help="lmdb (leveldb is not supported)")
    add_flag(parser, "accumulation", default="exact", choices=sorted(ACCUMULATIONS),
             help="; ".join(f"{k}: {v}" for k, v in ACCUMULATIONS.items()))


def run(args: argparse.Namespace) -> int:
    backend = args.backend.lower()
    if backend not in BACKENDS:
        raise ImagenetError(f"unknown --backend {args.backend!r}; valid: {sorted(BACKENDS)}")
    if not BACKENDS[backend]:
        raise ImagenetError(f"--backend={backend} is not supported; use --backend=lmdb "
                            f"(Caffe's default), which every Caffe build reads")
    result = compute_image_mean(args.input_db, args.output_file, accumulation=args.accumulation)
    lines = result.log_lines()
    if result.output_file is not None:
        lines.insert(1, f"Write to {result.output_file}")
    print("\n".join(lines))
    return 0
