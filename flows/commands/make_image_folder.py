"""`imagenet make-image-folder OUTDIR [--per_class 40 --seed 0 --clean]`: write a folder of class
folders of generated photos (data/image_folder.py), the shape `imagenet pipeline --images=DIR`
takes: four classes of odd-sized JPEGs and PNGs, some grayscale, some in a nested folder, one
class name and some file names not ASCII; unless --clean, also a class with a single image, an
empty class folder, stray files and a file named .jpg that is not an image (the pipeline says
what it does with each).
"""
from __future__ import annotations

import argparse

from data.image_folder import SAMPLE_PER_CLASS, make_image_folder
from flows.flags import add_flag, int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", metavar="OUTDIR", help="the folder to write (one subfolder per "
                        "class)")
    add_flag(parser, "per_class", type=int_at_least(1), default=SAMPLE_PER_CLASS,
             help="images per class")
    add_flag(parser, "seed", type=int, default=0, help="same seed, same bytes")
    add_flag(parser, "clean", type=bool, default=False,
             help="only the four classes' images (no single-image class, empty folder, stray "
                  "or broken files)")


def run(args: argparse.Namespace) -> int:
    result = make_image_folder(args.outdir, per_class=args.per_class, seed=args.seed,
                               messy=not args.clean)
    images = sum(len(v) for v in result.classes.values())
    print(f"wrote {result.folder}: {images} files in {len(result.classes)} class folders "
          f"({', '.join(result.classes)})"
          + (f", plus {', '.join(result.extras)}" if result.extras else ""))
    return 0
