"""`imagenet make-mini-ilsvrc12 OUTDIR [--classes 10 --train-per-class 100 --val-per-class 20
--seed 0 --profile mini]`: write a small dataset with exactly ILSVRC2012's shape (data/mini.py): the train tar
of per-synset tars, the val tar, Caffe's aux tarball, a devkit, Kaggle's CSV and MD5SUMS.
"""
from __future__ import annotations

import argparse

from data.errors import ImagenetError
from data.mini import PROFILES, SIZES, make_mini_ilsvrc12
from data.progress import Progress
from flows.commands.download import MB
from flows.flags import add_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", metavar="OUTDIR", help="folder to write the archives into")
    add_flag(parser, "size", default="default",
             help=f"preset ({', '.join(f'{k}: {v[0]}x{v[1]}+{v[2]}' for k, v in SIZES.items())}); "
                  "the flags below override it")
    add_flag(parser, "classes", type=int, help="number of classes (ILSVRC2012's real WNIDs in synsets.txt order, "
                                                 "1 to 1000)")
    add_flag(parser, "train_per_class", type=int, help="train images per class")
    add_flag(parser, "val_per_class", type=int, help="val images per class")
    add_flag(parser, "seed", type=int, default=0, help="same seed, same bytes")
    add_flag(parser, "profile", default="mini", choices=sorted(PROFILES),
             help="how the images look on disk: mini (small files, fast) or ilsvrc (the sizes, "
                  "~200k pixels and ~110 KB of real ILSVRC2012 photos)")


def run(args: argparse.Namespace) -> int:
    if args.size not in SIZES:
        raise ImagenetError(f"unknown --size {args.size!r}; valid: {', '.join(SIZES)}")
    classes, train, val = SIZES[args.size]
    classes = classes if args.classes is None else args.classes
    train = train if args.train_per_class is None else args.train_per_class
    val = val if args.val_per_class is None else args.val_per_class
    with Progress(classes * (train + val), "mini-ILSVRC12", unit="img") as bar:
        def progress(done: int, total: int | None) -> None:
            bar.update(done - bar.done)

        result = make_mini_ilsvrc12(args.outdir, classes=classes, train_per_class=train,
                                    val_per_class=val, seed=args.seed, profile=args.profile,
                                    progress=progress)
    size = sum(p.stat().st_size for p in result.archives())
    print(f"wrote {result.outdir}: {len(result.synsets)} classes, {result.train_images} train + "
          f"{result.val_images} val images, {len(result.archives())} archives "
          f"({size / MB:,.1f} MB) in {result.seconds:.1f} s; checksums in {result.md5sums}")
    return 0
