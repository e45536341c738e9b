"""ILSVRC2012 as Caffe sees it: the known archives, the on-disk layout, the synset <-> label
mapping and the four listing files (synsets.txt, synset_words.txt, train.txt, val.txt).

Caffe's data/ilsvrc12/get_ilsvrc_aux.sh ships these listings in caffe_ilsvrc12.tar.gz; label i is
line i of synsets.txt, which holds the WNIDs in ASCII order. A listing line is
`<relative path> <int label>` and, as tools/convert_imageset.cpp reads it, is split at its LAST
space. Everything here is plain text I/O; writers are atomic (temp name + rename).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError
from data.textlines import caffe_lines, read_text

# A WordNet noun id as ILSVRC uses them: "n" + 8 digits.
WNID_RE = re.compile(r"^n\d{8}$")
# Names of the val images in ILSVRC2012_img_val.tar; the number is the line of the devkit's
# ILSVRC2012_validation_ground_truth.txt that holds its ILSVRC2012_ID.
VAL_NAME_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
VAL_NAME_FORMAT = "ILSVRC2012_val_{:08d}.JPEG"

# Layout of an extracted data root (what `imagenet fetch` leaves behind).
TRAIN_DIR = "train"
VAL_DIR = "val"
SYNSETS_FILE = "synsets.txt"
SYNSET_WORDS_FILE = "synset_words.txt"
TRAIN_LIST = "train.txt"
VAL_LIST = "val.txt"
LISTING_FILES = (SYNSETS_FILE, SYNSET_WORDS_FILE, TRAIN_LIST, VAL_LIST)

# File names inside the archives.
AUX_ARCHIVE = "caffe_ilsvrc12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_META = "data/meta.mat"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSET_MAPPING = "LOC_synset_mapping.txt"
# Never unpickled, never extracted: a pickle can run arbitrary code when loaded.
AUX_UNTRUSTED = ("imagenet.bet.pickle",)


@dataclass(frozen=True)
class KnownArchive:
    """An official ILSVRC2012 file: its name, md5 and size (None where not verified)."""

    name: str
    md5: str
    size: int | None
    kind: str  # "train", "val", "devkit", "aux"


# From ../shared/docs/CAFFE_FACTS.md (the public ImageNet release).
KNOWN_ARCHIVES: dict[str, KnownArchive] = {
    a.name: a
    for a in (
        KnownArchive("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e",
                     147_897_477_120, "train"),
        KnownArchive("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622",
                     6_744_924_160, "val"),
        KnownArchive("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf",
                     None, "devkit"),
    )
}
TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
ILSVRC2012_CLASSES = 1000
ILSVRC2012_TRAIN_IMAGES = 1_281_167
ILSVRC2012_VAL_IMAGES = 50_000


def known_archive(name: str) -> KnownArchive | None:
    """The official archive called `name` (a basename), or None."""
    return KNOWN_ARCHIVES.get(name)


def check_wnid(wnid: str, where: str) -> str:
    if not WNID_RE.match(wnid):
        raise ImagenetError(f"{where}: {wnid!r} is not a WordNet id (expected n + 8 digits)")
    return wnid


def labels_of(synsets: list[str]) -> dict[str, int]:
    """WNID -> label: the index in the ASCII-sorted synsets list (Caffe's synsets.txt order)."""
    return {wnid: i for i, wnid in enumerate(synsets)}


def sort_synsets(wnids: Iterable[str]) -> list[str]:
    """The WNIDs in synsets.txt order (ASCII, which is what sorted() does on these names)."""
    return sorted(set(wnids))


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Write `text` to `path` via a temp name + rename, so a kill never leaves half a file;
    `durable` also fsyncs it (pointless for a marker whose data files are not fsynced)."""
    # surrogateescape: a file name that is not UTF-8 goes back as the bytes the OS gave
    write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"), durable=durable)


def _lines(path: Path) -> list[str]:
    """A listing's lines; names that are not UTF-8 come back as the OS's bytes (as Caffe reads
    them), so a tree holding such a file lists and converts."""
    return caffe_lines(read_text(path, errors="surrogateescape"))


def parse_synsets(lines: list[str], where: str) -> list[str]:
    """synsets.txt content -> WNIDs; they must be WNIDs, unique and ASCII-sorted."""
    out: list[str] = []
    for i, line in enumerate(lines, 1):
        wnid = line.strip()
        if not wnid:
            continue
        out.append(check_wnid(wnid, f"{where}:{i}"))
    if len(set(out)) != len(out):
        dup = sorted({w for w in out if out.count(w) > 1})[:5]
        raise ImagenetError(f"{where}: duplicate WNIDs {dup}")
    if out != sorted(out):
        first = next(i for i in range(1, len(out)) if out[i] < out[i - 1])
        raise ImagenetError(
            f"{where}:{first + 1}: synsets are not ASCII-sorted ({out[first - 1]} before "
            f"{out[first]}); labels would not match Caffe's")
    return out


def read_synsets(path: Path) -> list[str]:
    return parse_synsets(_lines(path), str(path))


def write_synsets(path: Path, synsets: list[str]) -> None:
    parse_synsets(list(synsets), str(path))  # refuse to write an unsorted/invalid list
    atomic_write_text(path, "".join(f"{w}\n" for w in synsets))


def parse_synset_words(lines: list[str], where: str) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {wnid: words} (file order kept)."""
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, words = line.partition(" ")
        check_wnid(wnid, f"{where}:{i}")
        if wnid in out:
            raise ImagenetError(f"{where}:{i}: WNID {wnid} listed twice")
        out[wnid] = words.strip()
    return out


def read_synset_words(path: Path) -> dict[str, str]:
    return parse_synset_words(_lines(path), str(path))


def write_synset_words(path: Path, synsets: list[str], words: dict[str, str]) -> None:
    """One line per synset in synsets.txt order, like Caffe's synset_words.txt."""
    missing = [w for w in synsets if w not in words]
    if missing:
        raise ImagenetError(f"{path}: no words for {len(missing)} synsets, e.g. {missing[:5]}")
    atomic_write_text(path, "".join(f"{w} {words[w]}\n" for w in synsets))


def parse_listing(lines: list[str], where: str) -> list[tuple[str, int]]:
    """Caffe listing lines -> (path, label); split at the LAST space (convert_imageset.cpp)."""
    out: list[tuple[str, int]] = []
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        path, sep, label = line.rpartition(" ")
        if not sep or not path:
            raise ImagenetError(f"{where}:{i}: expected '<path> <label>', got {line!r}")
        try:
            out.append((path, int(label)))
        except ValueError:
            raise ImagenetError(f"{where}:{i}: label {label!r} is not an integer") from None
    return out


def read_listing(path: Path) -> list[tuple[str, int]]:
    return parse_listing(_lines(path), str(path))


def format_listing(entries: Iterable[tuple[str, int]]) -> str:
    return "".join(f"{p} {label}\n" for p, label in entries)


def write_listing(path: Path, entries: Iterable[tuple[str, int]]) -> None:
    atomic_write_text(path, format_listing(entries))


def parse_md5sums(text: str, where: str) -> dict[str, str]:
    """md5sum(1) output (`<hex>  <name>` or `<hex> *<name>`) -> {basename: md5}."""
    out: dict[str, str] = {}
    for i, line in enumerate(caffe_lines(text), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not re.fullmatch(r"[0-9a-fA-F]{32}", digest) or not name:
            raise ImagenetError(f"{where}:{i}: expected '<md5>  <file name>', got {line!r}")
        out[os.path.basename(name)] = digest.lower()
    return out


def format_md5sums(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sums.items())
