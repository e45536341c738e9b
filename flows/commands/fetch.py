"""`imagenet fetch --train SRC --val SRC [--aux SRC] [--devkit SRC | --val-solution SRC]
[--checksums MD5SUMS] --data-root DIR`: the whole acquisition stage.

1. Download (or verify in place) every archive into DIR/downloads; ALL are verified before
   anything is extracted, so a bad checksum stops the stage before it touches the tree.
2. Extract the train tar into DIR/train/<wnid>/ and the val tar into DIR/val/ (resumable).
3. Write DIR/synsets.txt, synset_words.txt, train.txt, val.txt (Caffe's aux files if --aux is
   given, checked against the tree; derived from --devkit / --val-solution / a val tree sorted
   into class folders otherwise; with both, they must agree line for line).
SRC is a URL (http, https, file) or a path. --checksums takes an md5sum-format file (path or
URL) for archives that are not the official ones (the official names are checked against
ImageNet's md5s by default).
"""
from __future__ import annotations

import argparse
import os
import urllib.parse
from pathlib import Path

from data import ilsvrc12
from data.download import DEFAULT_RETRIES, download
from data.errors import ImagenetError
from data.extract import extract_train, extract_val
from data.listings import write_listings
from flows.commands.download import byte_progress, describe
from flows.commands.extract import describe as describe_extract
from flows.flags import add_flag, int_at_least

DOWNLOADS_DIR = "downloads"


def source_name(source: str) -> str:
    """The file name a source will have (the URL path's or the path's last part)."""
    if "://" in source:
        return os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
    return Path(source).name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "train", required=True, help="ILSVRC2012_img_train.tar (URL or path)")
    add_flag(parser, "val", required=True, help="ILSVRC2012_img_val.tar (URL or path)")
    add_flag(parser, "aux", help="Caffe's caffe_ilsvrc12.tar.gz (URL or path)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz (URL or path) for the "
                        "val labels")
    labels.add_argument("--val-solution", "--val_solution", dest="val_solution",
                        help="Kaggle's LOC_val_solution.csv (URL or path) for the val labels")
    add_flag(parser, "synset_words", help="synset_words.txt-format file for the words "
             "(default: from the aux tarball, the devkit, or LOC_synset_mapping.txt beside "
             "the CSV)")
    add_flag(parser, "checksums", help="md5sum-format file (path or URL) for non-official archives")
    add_flag(parser, "data_root", required=True, help="where train/, val/ and the listings go")
    add_flag(parser, "downloads", help=f"where downloads go (default DATA_ROOT/{DOWNLOADS_DIR})")
    add_flag(parser, "retries", type=int_at_least(0), default=DEFAULT_RETRIES,
             help="retries in a row without progress of transient download failures "
             "(timeouts, drops, HTTP 408/429/5xx; each resumes)")


def _fetch(source: str, dest: Path, sums: dict[str, str], retries: int) -> Path:
    name = source_name(source)
    with byte_progress(f"download {name}") as progress:
        result = download(source, dest, md5=sums.get(name), retries=retries, progress=progress)
    print(describe(result))
    return result.path


def run(args: argparse.Namespace) -> int:
    # The data root is created by the first download or extraction: an archive that is
    # missing or fails its checksum leaves no empty folders behind.
    root = Path(args.data_root)
    downloads = Path(args.downloads) if args.downloads else root / DOWNLOADS_DIR
    sums: dict[str, str] = {}
    if args.checksums:
        if "://" in args.checksums and not args.checksums.startswith("file:"):
            # Always fetched afresh: a stale checksum list would bless stale archives.
            (downloads / source_name(args.checksums)).unlink(missing_ok=True)
        path = download(args.checksums, downloads, retries=args.retries).path
        sums = ilsvrc12.parse_md5sums(path.read_text(), str(args.checksums))

    # 1. Everything is downloaded and verified before anything is extracted.
    train = _fetch(args.train, downloads, sums, args.retries)
    val = _fetch(args.val, downloads, sums, args.retries)
    aux = _fetch(args.aux, downloads, sums, args.retries) if args.aux else None
    devkit = _fetch(args.devkit, downloads, sums, args.retries) if args.devkit else None
    solution = _fetch(args.val_solution, downloads, sums, args.retries) \
        if args.val_solution else None
    words = _fetch(args.synset_words, downloads, sums, args.retries) \
        if args.synset_words else None

    # 2. Extraction (each step resumes where a killed run stopped).
    with byte_progress("extract train") as progress:
        print(describe_extract(extract_train(train, root, progress=progress)))
    with byte_progress("extract val") as progress:
        print(describe_extract(extract_val(val, root, progress=progress)))

    # 3. Listings. A val archive sorted into class folders labels itself.
    val_dir = root / ilsvrc12.VAL_DIR
    val_tree = not (devkit or solution) and any(
        p.is_dir() and ilsvrc12.WNID_RE.match(p.name) for p in val_dir.iterdir())
    if not (aux or devkit or solution or val_tree):
        raise ImagenetError("no way to label the val images: pass --aux, --devkit or "
                            "--val-solution (or a val archive sorted into class folders)")
    result = write_listings(root, aux=aux, devkit=devkit, val_solution=solution,
                            val_tree=val_tree, synset_words=words)
    for note in result.notes:
        print(f"note: {note}")
    print(f"{root}: listings from {result.source}: {result.counts['synsets']} synsets, "
          f"{result.counts['train']:,} train, {result.counts['val']:,} val images "
          f"({', '.join(p.name for p in result.paths.values())})")
    return 0
