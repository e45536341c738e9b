"""`imagenet extract ARCHIVE --to DIR [--kind auto|train|val|archive] [--workers N]`: safe,
resumable extraction (data/extract.py). `auto` treats ILSVRC2012_img_train*.tar as the tar of per-synset
tars (-> DIR/train/<wnid>/), ILSVRC2012_img_val*.tar as the flat val tar (-> DIR/val/), and
anything else as a plain archive extracted into DIR.
"""
from __future__ import annotations

import argparse

from data.extract import EXTRACTORS, ExtractResult, extract, guess_kind
from flows.commands.download import MB, byte_progress
from flows.flags import add_flag


def describe(result: ExtractResult) -> str:
    text = (f"{result.dest}: {result.files:,} files, {result.bytes:,} bytes in "
            f"{result.seconds:.1f} s ({result.bytes / MB / max(result.seconds, 1e-9):,.1f} MB/s)")
    if result.synsets_extracted or result.synsets_skipped:
        text += (f"; {result.synsets_extracted} synsets extracted, {result.synsets_skipped} "
                 "already complete")
    if result.skipped_files:
        text += f"; {result.skipped_files:,} files already complete"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", metavar="ARCHIVE", help="the tar to extract")
    add_flag(parser, "to", required=True, help="data root (train/ and val/ go inside it)")
    add_flag(parser, "kind", default="auto",
             help=f"auto (by file name) or one of: {', '.join(EXTRACTORS)}")
    add_flag(parser, "workers", type=int, default=None,
             help="synset tars of a train archive extracted at once (default: one per core)")


def run(args: argparse.Namespace) -> int:
    kind = guess_kind(args.archive) if args.kind == "auto" else args.kind
    with byte_progress(f"extract {kind}") as progress:
        result = extract(args.archive, args.to, kind, progress=progress, workers=args.workers)
    print(describe(result))
    return 0
