"""A folder of labelled photos as a dataset: one subfolder per class (NVIDIA DIGITS's "new
classification dataset from a folder", digits/tools/parse_folder.py), turned into Caffe's
listings so the rest of the pipeline treats it like ILSVRC12.

Layouts (`scan` tells which):
- IMAGES/<class>/...: every image below a class folder, at any depth, belongs to that class;
  a seeded, stratified share of each class (`val_percent`) is held out for validation;
- IMAGES/train/<class>/... and IMAGES/val/<class>/...: the two sets used as they are.

What is written (`write_folder_listings`, into the data root): `labels.txt` (line i = the name
of class i; classes are the class folders in sorted order), and Caffe's `train.txt` / `val.txt`
(`<path relative to the image root> <label>`, sorted by path; convert shuffles them).

Each class's split follows DIGITS's three_way_split_indices (so a class of 2 or more images
always gives one to validation), but which images go to validation is decided by a hash of
the seed and the image's path, not by a shuffle: adding images to a folder moves at most one
or two of the others between train and val, so only what really changed is converted again.
Unlike DIGITS, a class with a single image is kept (in train) rather than dropped.

Everything found and not used is counted and reported, never dropped silently: files without
an image extension, hidden files and folders, files outside any class folder, names that a
listing line cannot hold (line breaks), empty class folders (left out of labels.txt), symbolic
links to folders (not followed). Fewer than two classes with images is an error.

`fingerprint(images)` (path, size and mtime of everything the scan looks at) is what the
pipeline's listings stage is keyed on; `listing_digest` ties a written listing to the size and
mtime of every file it names, so an image replaced in place is converted again.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from data.errors import ImagenetError
from data.ilsvrc12 import format_listing
from data.atomic import write_bytes_atomic
from data.textlines import caffe_lines, read_caffe_lines

TRAIN_LIST, VAL_LIST, LABELS_FILE = "train.txt", "val.txt", "labels.txt"
LISTING_FILES = (TRAIN_LIST, VAL_LIST, LABELS_FILE)
SPLIT_DIRS = ("train", "val")
# Extensions of the formats convert-imageset decodes (OpenCV's imread: tests/data check each
# one decodes). DIGITS takes .png .jpg .jpeg .bmp .ppm; matching is case-insensitive.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".pbm",
                              ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp", ".gif", ".jp2"})
DEFAULT_VAL_PERCENT = 25  # DIGITS's default "% for validation"
MIN_CLASSES = 2
EXAMPLES_SHOWN = 3
# A listing line is `<path> <label>\n`: a path holding a line break cannot be written as one.
_LINE_BREAKS = ("\n", "\r")

# Kinds of things found and not used (FolderScan.ignored keys), worded for the notes.
NOT_IMAGES = "files without an image extension"
HIDDEN = "hidden files and folders"
OUTSIDE = "files outside any class folder"
BAD_NAMES = "files whose names hold a line break (a listing line cannot)"
LINKED_DIRS = "symbolic links to folders (not followed)"
OTHER_TOP = "folders beside train/ and val/"
_SINGULAR = {NOT_IMAGES: "file without an image extension", HIDDEN: "hidden file or folder",
             OUTSIDE: "file outside any class folder",
             BAD_NAMES: "file whose name holds a line break (a listing line cannot)",
             LINKED_DIRS: "symbolic link to a folder (not followed)",
             OTHER_TOP: "folder beside train/ and val/"}


@dataclass
class FolderScan:
    """What `scan` found under one images folder."""

    images: Path
    split_layout: bool                              # IMAGES/train + IMAGES/val
    # {split: {class name: [path relative to the split's root]}}; "all" without split_layout
    files: dict[str, dict[str, list[str]]]
    ignored: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    empty_classes: list[str] = field(default_factory=list)

    def root(self, split: str) -> Path:
        """The folder the `split` listing's paths are relative to."""
        return self.images / split if self.split_layout else self.images


@dataclass
class FolderListings:
    """The listings of a folder dataset, in memory and as written."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    roots: dict[str, Path]                          # {"train" | "val": image root}
    notes: list[str]
    counts: dict[str, int]
    paths: dict[str, Path] = field(default_factory=dict)


def has_split_layout(images: Path) -> bool:
    """IMAGES/train and IMAGES/val both hold class folders (and no images of their own)."""
    for name in SPLIT_DIRS:
        sub = Path(images) / name
        if not sub.is_dir():
            return False
        with os.scandir(sub) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        if not any(e.is_dir() for e in entries) or any(_is_image(e.name) for e in entries
                                                        if e.is_file()):
            return False
    return True


def image_roots(images: Path | str) -> dict[str, Path]:
    """{"train": root, "val": root}: the folders the listings' paths are relative to."""
    images = Path(images)
    if has_split_layout(images):
        return {split: images / split for split in SPLIT_DIRS}
    return {split: images for split in SPLIT_DIRS}


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_folder(images: Path) -> None:
    if not images.exists():
        raise ImagenetError(f"{images}: no such folder (--images names a folder holding one "
                            "subfolder per class)")
    if not images.is_dir():
        raise ImagenetError(f"{images}: not a folder (--images names a folder holding one "
                            "subfolder per class)")


def _class_files(class_dir: Path, rel_prefix: str, ignored: dict[str, list[str]]) -> list[str]:
    """Every image below `class_dir` (any depth), as `rel_prefix/<relative path>`, sorted."""
    out: list[str] = []

    def onerror(err: OSError) -> None:
        raise ImagenetError(f"cannot list {err.filename}: {err.strerror}") from err

    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=onerror):
        rel_dir = os.path.relpath(dirpath, class_dir)
        prefix = rel_prefix if rel_dir == "." else f"{rel_prefix}/{rel_dir}"
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                ignored[HIDDEN].append(f"{prefix}/{d}/")
            elif os.path.islink(os.path.join(dirpath, d)):
                ignored[LINKED_DIRS].append(f"{prefix}/{d}")
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = f"{prefix}/{name}"
            if name.startswith("."):
                ignored[HIDDEN].append(rel)
            elif not _is_image(name):
                ignored[NOT_IMAGES].append(rel)
            elif any(c in rel for c in _LINE_BREAKS):
                ignored[BAD_NAMES].append(repr(rel))
            else:
                out.append(rel)
    return sorted(out)


def _scan_root(root: Path, ignored: dict[str, list[str]], where: str = ""
               ) -> dict[str, list[str]]:
    """{class: files} for the class folders directly under `root`."""
    classes: dict[str, list[str]] = {}
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        shown = f"{where}{entry.name}"
        if entry.name.startswith("."):
            ignored[HIDDEN].append(shown + ("/" if entry.is_dir() else ""))
        elif entry.is_dir(follow_symlinks=True):
            if any(c in entry.name for c in _LINE_BREAKS):
                ignored[BAD_NAMES].append(repr(shown + "/"))
                continue
            classes[entry.name] = _class_files(Path(entry.path), entry.name, ignored)
        else:
            ignored[OUTSIDE].append(shown)
    return classes


def scan(images: Path | str) -> FolderScan:
    """Find the classes and images under `images` (see the module docstring for the layouts)."""
    images = Path(images)
    _check_folder(images)
    ignored: dict[str, list[str]] = defaultdict(list)
    if has_split_layout(images):
        with os.scandir(images) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name not in SPLIT_DIRS:
                    kind = HIDDEN if entry.name.startswith(".") else (
                        OTHER_TOP if entry.is_dir() else OUTSIDE)
                    ignored[kind].append(entry.name)
        files = {split: _scan_root(images / split, ignored, f"{split}/") for split in SPLIT_DIRS}
    else:
        files = {"all": _scan_root(images, ignored)}
    result = FolderScan(images, "train" in files, files, ignored)
    names = files["train"] if result.split_layout else files["all"]
    result.empty_classes = sorted(c for c, fs in names.items() if not fs)
    return result


def _py2_round(x: float) -> int:
    """DIGITS ran on Python 2, whose round() takes halves away from zero."""
    return int(math.floor(x + 0.5))


def split_counts(size: int, val_percent: float) -> tuple[int, int]:
    """(train, val) counts of a class of `size` images: DIGITS's three_way_split_indices with
    no test set, so a class of two or more images always gives at least one to validation."""
    if not 0 < val_percent < 100:
        raise ImagenetError(f"val_percent must be between 0 and 100 (exclusive), got "
                            f"{val_percent}")
    a = _py2_round(size * (100 - val_percent) / 100)
    if size and not a:
        a = 1
    b = _py2_round(size * val_percent / 100)
    if a + b > size:
        b = size - a
    if not b and a > 1:
        a, b = a - 1, 1
    return a, size - a


def _order_key(seed: int, path: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{path}".encode("utf-8", "surrogateescape"),
                           digest_size=16).digest()


def split_class(files: list[str], val_percent: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) of one class: the images whose hash of (seed, path) is smallest go to val."""
    _, n_val = split_counts(len(files), val_percent)
    ordered = sorted(files, key=lambda f: _order_key(seed, f))
    val = set(ordered[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES_SHOWN])
    return shown + (", ..." if len(items) > EXAMPLES_SHOWN else "")


def _count(items: list, one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def folder_listings(images: Path | str, *, val_percent: float | None = None, seed: int = 0
                    ) -> FolderListings:
    """The listings of `images` (not written): labels, train and val entries and notes."""
    found = scan(images)
    notes: list[str] = []
    if found.split_layout:
        if val_percent is not None:
            raise ImagenetError(f"{found.images} holds train/ and val/ folders, which are used as "
                                "they are: leave val_percent out (it splits a folder of class "
                                "folders)")
        train_files, val_files = found.files["train"], found.files["val"]
        classes = sorted(c for c, fs in train_files.items() if fs)
        strays = sorted(c for c, fs in val_files.items() if fs and c not in classes)
        if strays:
            raise ImagenetError(f"{found.root('val')}: class folders with images that "
                                f"{found.root('train')} has no images for: {_examples(strays)}; "
                                "the net could never learn them: add their train images or "
                                "move them out")
        no_val = [c for c in classes if not val_files.get(c)]
        if no_val:
            notes.append(f"{_count(no_val, 'class has', 'classes have')} no val images "
                         f"({_examples(no_val)}): their accuracy is not measured")
        per_class = {c: (train_files[c], val_files.get(c, [])) for c in classes}
    else:
        percent = DEFAULT_VAL_PERCENT if val_percent is None else val_percent
        files = found.files["all"]
        classes = sorted(c for c, fs in files.items() if fs)
        per_class = {c: split_class(files[c], percent, seed) for c in classes}
        single = [c for c in classes if len(files[c]) == 1]
        if single:
            notes.append(f"{_count(single, 'class has', 'classes have')} a single image "
                         f"({_examples(single)}): it is in train.txt, none is held out for "
                         "validation")
    if found.empty_classes:
        notes.append(f"{_count(found.empty_classes, 'class folder holds', 'class folders hold')} "
                     f"no images: left out of {LABELS_FILE} ({_examples(found.empty_classes)})")
    for kind, items in sorted(found.ignored.items()):
        if items:
            what = kind if len(items) != 1 else _SINGULAR.get(kind, kind)
            notes.append(f"ignored {len(items)} {what}: {_examples(items)}")
    if len(classes) < MIN_CLASSES:
        raise ImagenetError(f"{found.images}: {len(classes)} class folders with images "
                            f"({_examples(classes) or 'none'}); a classifier needs at least "
                            f"{MIN_CLASSES}: put each class's images in a subfolder named after "
                            "the class")
    train = sorted((f, label) for label, c in enumerate(classes) for f in per_class[c][0])
    val = sorted((f, label) for label, c in enumerate(classes) for f in per_class[c][1])
    if not val:
        raise ImagenetError(f"{found.images}: no image is left for validation (every class has "
                            "a single image); add images or give a val/ folder")
    counts = {"classes": len(classes), "train": len(train), "val": len(val),
              "ignored": sum(len(v) for v in found.ignored.values()),
              "empty_classes": len(found.empty_classes)}
    roots = {split: found.root(split) for split in SPLIT_DIRS}
    return FolderListings(classes, train, val, roots, notes, counts)


def label_text(name: str) -> str:
    """A class folder's name as a labels.txt line: always UTF-8 (a name that is not is shown
    with \\x escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_folder_listings(data_root: Path | str, images: Path | str, *,
                          val_percent: float | None = None, seed: int = 0) -> FolderListings:
    """Write train.txt, val.txt and labels.txt for `images` into `data_root` (atomically)."""
    result = folder_listings(images, val_percent=val_percent, seed=seed)
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / name for name in LISTING_FILES}
    # Paths keep their bytes (a name that is not UTF-8 stays as it is on disk: convert reads
    # listings with surrogateescape).
    for name, entries in ((TRAIN_LIST, result.train), (VAL_LIST, result.val)):
        write_bytes_atomic(paths[name], format_listing(entries).encode("utf-8", "surrogateescape"))
    write_bytes_atomic(paths[LABELS_FILE],
                       "".join(label_text(c) + "\n" for c in result.classes).encode("utf-8"))
    result.paths = paths
    return result


def read_labels(path: Path | str) -> list[str]:
    """labels.txt: line i names class i."""
    try:
        lines = read_caffe_lines(path)
    except FileNotFoundError:
        raise ImagenetError(f"{path}: no labels file (has the listings stage run?)") from None
    return [line for line in lines if line]


def _stat_line(path: str, st: os.stat_result) -> bytes:
    return (path.encode("utf-8", "surrogateescape")
            + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def fingerprint(images: Path | str) -> str:
    """sha256 over the relative path, size and mtime of every file and folder below `images`
    (never their bytes): what the listings of this folder depend on."""
    images = Path(images)
    _check_folder(images)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(images):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, images)
        for name in sorted(filenames) + [d + "/" for d in dirnames]:
            full = os.path.join(dirpath, name.rstrip("/"))
            try:
                st = os.stat(full)
            except OSError:  # a dangling link: its name still counts
                st = os.lstat(full)
            h.update(_stat_line(os.path.join(rel_dir, name), st))
    return h.hexdigest()


def listing_digest(listing: Path | str, root: Path | str) -> str:
    """sha256 of a listing's bytes and the size and mtime of every file it names (relative to
    `root`): a listing whose images were replaced in place gets another digest."""
    listing, root = Path(listing), Path(root)
    data = listing.read_bytes()
    h = hashlib.sha256(data)
    for line in caffe_lines(data.decode("utf-8", "surrogateescape")):
        rel = line.rpartition(" ")[0]
        try:
            st = os.stat(root / rel)
        except OSError:  # gone since: convert reports it; the digest changes either way
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0missing\n")
            continue
        h.update(_stat_line(rel, st))
    return h.hexdigest()


def describe(entries: Iterable[tuple[str, int]], classes: list[str]) -> dict[str, int]:
    """Images per class name."""
    counts = {c: 0 for c in classes}
    for _, label in entries:
        counts[classes[label]] += 1
    return counts


# --------------------------------------------------------------------------- a sample folder

# The sample folder's classes: data.mini's drawings (a shape in a class palette over a noisy
# gradient) of classes the mini ILSVRC12 does not have (its are 0-9), so a net trained on the
# mini can be finetuned on these. One name is not ASCII on purpose.
SAMPLE_CLASSES = {"circle": 10, "square": 11, "triangle": 12, "rayé": 13}
SAMPLE_PER_CLASS = 40
# Odd sizes, any aspect ratio: (min, max) of each side in pixels.
SAMPLE_SIDES = (56, 140)
SAMPLE_JPEG_QUALITY = 90
# With messy=True: a class with a single image, an empty class folder, stray files, a file
# named like an image that is not one, a nested folder, and names with spaces, accents and an
# upper-case extension; every 5th image a PNG, every 7th a grayscale JPEG.
SINGLE_CLASS, SINGLE_INDEX = "lonely", 14
EMPTY_CLASS = "empty"
NESTED_DIR = "more"
PNG_EVERY, GRAY_EVERY, ODD_NAME_EVERY = 5, 7, 6


@dataclass
class SampleFolder:
    """What make_image_folder wrote: per class the image paths (relative to the folder), and
    with messy=True the extras by kind (a path each)."""

    folder: Path
    classes: dict[str, list[str]]
    extras: dict[str, str] = field(default_factory=dict)


def make_image_folder(folder: Path | str, *, classes: dict[str, int] | None = None,
                      per_class: int = SAMPLE_PER_CLASS, seed: int = 0, messy: bool = True
                      ) -> SampleFolder:
    """Write a folder of class folders of generated photos (the same bytes for the same
    arguments) for the README's example and the tests; `classes` maps a folder name to a
    data.mini class index (its drawing)."""
    from data.mini import PROFILES, Profile, encode, render_image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    plan = dict(classes or SAMPLE_CLASSES)
    if messy:
        plan[SINGLE_CLASS] = SINGLE_INDEX
    for name, index in plan.items():
        rng = np.random.default_rng([seed, index])
        count = 1 if messy and name == SINGLE_CLASS else per_class
        written[name] = []
        for i in range(count):
            w, h = (int(v) for v in rng.integers(SAMPLE_SIDES[0], SAMPLE_SIDES[1] + 1, 2))
            profile = Profile((((w, h), 1.0),), SAMPLE_JPEG_QUALITY, PROFILES["mini"].grain_sigma)
            image, _ = render_image(index, rng, profile)
            kind, ext = None, ".jpg"
            if messy and i % PNG_EVERY == PNG_EVERY - 1:
                kind, ext = "png", ".png"
            elif messy and i % GRAY_EVERY == GRAY_EVERY - 1:
                kind = "grayscale"
            stem = f"IMG_{i:04d}"
            if messy and i % ODD_NAME_EVERY == ODD_NAME_EVERY - 1:
                stem, ext = f"été 2024 ({i})", ext.upper()
            sub = f"{NESTED_DIR}/" if messy and i % 3 == 2 and index % 2 else ""
            rel = f"{name}/{sub}{stem}{ext}"
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(image, kind, quality=SAMPLE_JPEG_QUALITY))
            written[name].append(rel)
    result = SampleFolder(out, written)
    if messy:
        extras = {"empty class": f"{EMPTY_CLASS}/", "stray file": "notes.txt",
                  "stray file in a class": "circle/Thumbs.db", "hidden file": "circle/.DS_Store",
                  "not an image": "triangle/broken.jpg"}
        (out / EMPTY_CLASS).mkdir(exist_ok=True)
        (out / "notes.txt").write_text("photos from the garden\n")
        (out / "circle" / "Thumbs.db").write_bytes(b"\0" * 64)
        (out / "circle" / ".DS_Store").write_bytes(b"\0" * 64)
        (out / "triangle" / "broken.jpg").write_text("this is not a JPEG\n")
        result.extras = extras
        written["triangle"].append("triangle/broken.jpg")
    return result
