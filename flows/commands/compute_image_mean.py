"""`imagenet compute-image-mean [--backend lmdb] INPUT_DB [OUTPUT_FILE]`: Caffe's
compute_image_mean (tools/compute_image_mean.cpp): writes mean.binaryproto and prints the
per-channel means as Caffe logs them. Logic lives in data.mean.
"""
from __future__ import annotations

import argparse

from data.mean import ACCUMULATIONS, DEFAULT_ACCUMULATION, compute_image_mean
from flows.flags import add_flag, check_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_db", metavar="INPUT_DB", help="LMDB of Datums")
    parser.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?", default=None,
                        help="where to write the mean (.binaryproto); omitted: only print it")
    add_flag(parser, "backend", default="lmdb", help="lmdb (leveldb is not supported)")
    add_flag(parser, "accumulation", default=DEFAULT_ACCUMULATION, choices=sorted(ACCUMULATIONS),
             help="; ".join(f"{k}: {v}" for k, v in ACCUMULATIONS.items()))


def run(args: argparse.Namespace) -> int:
    check_backend(args.backend)
    result = compute_image_mean(args.input_db, args.output_file, accumulation=args.accumulation)
    lines = result.log_lines()
    if result.output_file is not None:
        lines.insert(1, f"Write to {result.output_file}")
    print("\n".join(lines))
    return 0
