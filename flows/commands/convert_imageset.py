"""`imagenet convert-imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME`: Caffe's convert_imageset.

Takes Caffe's own flags (tools/convert_imageset.cpp), so create_imagenet.sh works with only the
binary name changed, plus --seed, --workers, --max-skipped and --overwrite. Logic lives in
data.convert; this module parses flags and prints Caffe-like log lines.
"""
from __future__ import annotations

import argparse
import logging
import sys

from data.convert import check_options, convert_imageset, read_listing
from data.images import RESIZE_MODES, SQUASH
from flows.flags import add_flag, check_backend, int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root_folder", metavar="ROOTFOLDER/",
                        help="folder the listing's paths are relative to")
    parser.add_argument("listfile", metavar="LISTFILE",
                        help="lines '<path> <label>' (split at the last space)")
    parser.add_argument("db_name", metavar="DB_NAME", help="the LMDB directory to create")
    add_flag(parser, "gray", type=bool, default=False,
             help="treat images as grayscale (1 channel)")
    add_flag(parser, "shuffle", type=bool, default=False,
             help="shuffle the listing before converting (reproducible with --seed)")
    add_flag(parser, "backend", default="lmdb", help="lmdb (leveldb is not supported)")
    add_flag(parser, "resize_width", type=int_at_least(0), default=0,
             help="resize to this width (needs --resize_height too; 0 = keep)")
    add_flag(parser, "resize_height", type=int_at_least(0), default=0,
             help="resize to this height (needs --resize_width too; 0 = keep)")
    add_flag(parser, "resize_mode", default=SQUASH, choices=RESIZE_MODES,
             help="how images reach the resize size (squash: "
             "Caffe's, aspect ratio ignored; crop: keep the aspect ratio, cut the centre; fill: "
             "keep it, pad with noise; half_crop: half of each; NVIDIA DIGITS's modes)")
    add_flag(parser, "check_size", type=bool, default=False,
             help="fail if the images do not all have the same size")
    add_flag(parser, "encoded", type=bool, default=False,
             help="store encoded image bytes in the Datum instead of pixels")
    add_flag(parser, "encode_type", default="",
             help="re-encode as this format (jpg, png, ...); implies --encoded")
    add_flag(parser, "seed", type=int, default=None,
             help="seed for --shuffle (default: random, and printed so it can be replayed)")
    add_flag(parser, "workers", type=int_at_least(1), default=None,
             help="decode/resize threads (default: all cores); the DB is the same for any")
    add_flag(parser, "max_skipped", type=int_at_least(0), default=None,
             help="fail (and write no DB) if more than this many images cannot be converted")
    add_flag(parser, "overwrite", type=bool, default=False,
             help="replace an existing DB_NAME (only once the new one is complete)")


def run(args: argparse.Namespace) -> int:
    # Every flag is checked before anything is printed or read (convert_imageset checks them
    # again for library callers).
    check_backend(args.backend)
    check_options(args.resize_height, args.resize_width, args.encode_type,
                  resize_mode=args.resize_mode)
    # Warnings (skipped / truncated images) as one plain line each on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    if args.encode_type and not args.encoded:
        print("encode_type specified, assuming encoded=true.", file=sys.stderr)
    print(f"A total of {len(read_listing(args.listfile))} images.", file=sys.stderr)
    result = convert_imageset(
        args.root_folder, args.listfile, args.db_name,
        resize_height=args.resize_height, resize_width=args.resize_width,
        resize_mode=args.resize_mode, shuffle=args.shuffle, seed=args.seed, gray=args.gray, encoded=args.encoded,
        encode_type=args.encode_type, check_size=args.check_size, workers=args.workers,
        overwrite=args.overwrite, max_skipped=args.max_skipped, digest=False)
    if result.seed is not None and args.seed is None:
        print(f"Shuffled with --seed={result.seed} (pass it to reproduce this order).",
              file=sys.stderr)
    print(result.summary())
    return 0
