"""Caffe's ILSVRC12 listings (synsets.txt, synset_words.txt, train.txt, val.txt) for a data root,
from whichever source the user has.

- Caffe's aux tarball `caffe_ilsvrc12.tar.gz` (data/ilsvrc12/get_ilsvrc_aux.sh): the listing
  members are read straight from the archive; nothing is extracted, and `imagenet.bet.pickle` is
  never read (unpickling runs arbitrary code).
- Derived from the extracted tree: synsets = the ASCII-sorted class folders of `train/`, label =
  index, train.txt = every `<wnid>/<file>` sorted by path (the order of Caffe's aux train.txt),
  and val labels from ONE of:
  * the devkit (`ILSVRC2012_devkit_t12.tar.gz` or its folder): the ground truth holds
    ILSVRC2012_IDs, which index the devkit's meta.mat synsets (NOT the sorted-WNID labels), so
    they are mapped ID -> WNID -> label. meta.mat is read with scipy.io (data/devkit_meta.py); a
    plain-text `ILSVRC2012_mapping.txt` (`<ILSVRC2012_ID> <WNID>` per line) in the devkit's data/
    folder is used instead where meta.mat is absent;
  * Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`; the first token is the WNID);
  * a val tree already sorted into class folders, which is flattened to `val/<file>` (the labels
    are saved first, so a killed flatten resumes) so that val.txt matches Caffe's.
  val.txt lists the val images sorted by file name, as Caffe's does.
Derived listings equal Caffe's aux files line for line for the same data. Any mismatch (a val
image with no label, a label outside the synsets, a listing entry with no file...) is counted,
reported with the first examples, and fails the stage.
"""
from __future__ import annotations

import csv
import io
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data import devkit_meta
from data import ilsvrc12
from data.errors import ImagenetError
from data.extract import STATE_DIR
from data.textlines import caffe_lines, read_caffe_lines

EXAMPLES_SHOWN = 3
PLAIN_MAPPING = "ILSVRC2012_mapping.txt"
VAL_TREE_LABELS = "val_tree_labels.txt"  # in STATE_DIR: labels saved before flattening
# Members of Caffe's aux tarball that we read; everything else in it is left alone.
AUX_WANTED = (ilsvrc12.SYNSETS_FILE, ilsvrc12.SYNSET_WORDS_FILE, ilsvrc12.TRAIN_LIST,
              ilsvrc12.VAL_LIST)


@dataclass
class Listings:
    """The four listings in memory. `words` may be empty when no source had them."""

    synsets: list[str]
    words: dict[str, str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]


@dataclass
class ListingsResult:
    source: str  # "aux", "devkit", "val-solution", "val-tree" (+ "aux, checked against ...")
    counts: dict[str, int]
    paths: dict[str, Path]
    notes: list[str] = field(default_factory=list)


class Mismatches:
    """Problems by kind, with counts and the first few examples, raised as one line."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES_SHOWN:
            self.examples[kind].append(example)

    def raise_if_any(self) -> None:
        if not self.counts:
            return
        parts = [f"{n:,} {kind} (e.g. {', '.join(self.examples[kind])})"
                 for kind, n in self.counts.items()]
        raise ImagenetError(f"{self.where}: " + "; ".join(parts))


def _visible_files(folder: Path) -> list[str]:
    """Names of the regular files in `folder`, skipping hidden ones (our temp names)."""
    with os.scandir(folder) as it:
        return [e.name for e in it if not e.name.startswith(".") and e.is_file()]


# --------------------------------------------------------------------------- sources


def read_aux(aux_tar: Path) -> Listings:
    """Listings from Caffe's caffe_ilsvrc12.tar.gz, read in memory (nothing extracted)."""
    aux_tar = Path(aux_tar)
    texts: dict[str, list[str]] = {}
    try:
        with tarfile.open(aux_tar, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isreg() and base in AUX_WANTED:
                    data = tar.extractfile(member).read()
                    texts[base] = caffe_lines(data.decode("utf-8"))
    except FileNotFoundError:
        raise ImagenetError(f"{aux_tar}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as err:
        raise ImagenetError(f"{aux_tar}: not a readable aux tarball ({err})") from None
    missing = [n for n in AUX_WANTED if n not in texts]
    if missing:
        raise ImagenetError(f"{aux_tar}: missing {', '.join(missing)}; is this Caffe's "
                            f"{ilsvrc12.AUX_ARCHIVE}?")
    where = lambda name: f"{aux_tar}:{name}"  # noqa: E731
    return Listings(
        synsets=ilsvrc12.parse_synsets(texts[ilsvrc12.SYNSETS_FILE], where("synsets.txt")),
        words=ilsvrc12.parse_synset_words(texts[ilsvrc12.SYNSET_WORDS_FILE],
                                          where("synset_words.txt")),
        train=ilsvrc12.parse_listing(texts[ilsvrc12.TRAIN_LIST], where("train.txt")),
        val=ilsvrc12.parse_listing(texts[ilsvrc12.VAL_LIST], where("val.txt")),
    )


def derive_train(data_root: Path) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(synsets, train entries, notes) from data_root/train/<wnid>/<file>."""
    train_dir = Path(data_root) / ilsvrc12.TRAIN_DIR
    if not train_dir.is_dir():
        raise ImagenetError(f"{train_dir}: no train folder (extract the train archive first)")
    problems = Mismatches(f"{train_dir}: not an ILSVRC train tree")
    wnids: list[str] = []
    with os.scandir(train_dir) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                problems.add("files outside any class folder", entry.name)
            elif not ilsvrc12.WNID_RE.match(entry.name):
                problems.add("folders that are not WNIDs", entry.name)
            else:
                wnids.append(entry.name)
    problems.raise_if_any()
    synsets = ilsvrc12.sort_synsets(wnids)
    if not synsets:
        raise ImagenetError(f"{train_dir}: no class folders")
    entries: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, wnid in enumerate(synsets):
        names = _visible_files(train_dir / wnid)
        if not names:
            empty.append(wnid)
        entries.extend((f"{wnid}/{name}", label) for name in names)
    entries.sort(key=lambda e: e[0])  # Caffe's aux train.txt is sorted by path
    notes = [f"{len(empty)} class folders are empty (e.g. {', '.join(empty[:3])})"] if empty else []
    return synsets, entries, notes


def _devkit_files(devkit: Path) -> dict[str, bytes]:
    """{'meta.mat' | 'ILSVRC2012_mapping.txt' | ground truth name: bytes} from a devkit
    tarball or folder."""
    want = (Path(ilsvrc12.DEVKIT_META).name, Path(ilsvrc12.DEVKIT_GROUND_TRUTH).name,
            PLAIN_MAPPING)
    out: dict[str, bytes] = {}
    if devkit.is_dir():
        for name in want:
            hits = sorted(devkit.rglob(name))
            if hits:
                out[name] = hits[0].read_bytes()
        return out
    try:
        with tarfile.open(devkit, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isreg() and base in want and base not in out:
                    out[base] = tar.extractfile(member).read()
    except FileNotFoundError:
        raise ImagenetError(f"{devkit}: no such file or folder") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ImagenetError(f"{devkit}: not a readable devkit archive ({err})") from None
    return out


def devkit_synsets(devkit: Path) -> tuple[dict[int, str], dict[str, str]]:
    """(ILSVRC2012_ID -> WNID for the leaf synsets, WNID -> words) from the devkit."""
    devkit = Path(devkit)
    files = _devkit_files(devkit)
    ids: dict[int, str] = {}
    words: dict[str, str] = {}
    if "meta.mat" in files:
        for synset in devkit_meta.read_meta(files["meta.mat"], f"{devkit}:meta.mat"):
            if synset.num_children > 0:
                continue  # an inner WordNet node, not one of the classes
            ids[synset.ilsvrc2012_id] = synset.wnid
            words[synset.wnid] = synset.words
    elif PLAIN_MAPPING in files:
        where = f"{devkit}:{PLAIN_MAPPING}"
        for i, line in enumerate(caffe_lines(files[PLAIN_MAPPING].decode()), 1):
            if not line.strip():
                continue
            fields = line.split(None, 2)
            if len(fields) < 2 or not fields[0].isdigit():
                raise ImagenetError(f"{where}:{i}: expected '<ILSVRC2012_ID> <WNID> [words]'")
            ids[int(fields[0])] = ilsvrc12.check_wnid(fields[1], f"{where}:{i}")
            if len(fields) == 3:
                words[fields[1]] = fields[2].strip()
    else:
        raise ImagenetError(f"{devkit}: has neither data/meta.mat nor {PLAIN_MAPPING}")
    return ids, words


def val_labels_from_devkit(devkit: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({val file name: WNID}, {WNID: words}); ground-truth line i is ILSVRC2012_val_<i>."""
    devkit = Path(devkit)
    ids, words = devkit_synsets(devkit)
    gt_name = Path(ilsvrc12.DEVKIT_GROUND_TRUTH).name
    files = _devkit_files(devkit)
    if gt_name not in files:
        raise ImagenetError(f"{devkit}: no {ilsvrc12.DEVKIT_GROUND_TRUTH}")
    problems = Mismatches(f"{devkit}:{gt_name}")
    labels: dict[str, str] = {}
    for i, line in enumerate(caffe_lines(files[gt_name].decode()), 1):
        text = line.strip()
        if not text.isdigit():
            raise ImagenetError(f"{devkit}:{gt_name}:{i}: expected an ILSVRC2012_ID, got {line!r}")
        if int(text) not in ids:
            problems.add("ILSVRC2012_IDs that are not classes in meta.mat", f"line {i}: {text}")
            continue
        labels[ilsvrc12.VAL_NAME_FORMAT.format(i)] = ids[int(text)]
    problems.raise_if_any()
    return labels, words


def val_labels_from_solution(csv_path: Path) -> dict[str, str]:
    """{val file name: WNID} from Kaggle's LOC_val_solution.csv."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImagenetError(f"{csv_path}: no such file") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header != ["ImageId", "PredictionString"]:
        raise ImagenetError(f"{csv_path}:1: expected header 'ImageId,PredictionString', "
                            f"got {header}")
    labels: dict[str, str] = {}
    for i, row in enumerate(rows, 2):
        if not row:
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not tokens:
            raise ImagenetError(f"{csv_path}:{i}: expected '<ImageId>,<WNID> x0 y0 x1 y1 ...'")
        wnids = set(tokens[0::5])
        if len(wnids) != 1:
            raise ImagenetError(f"{csv_path}:{i}: {row[0]} has boxes of several classes "
                                f"{sorted(wnids)}")
        name = f"{row[0]}.JPEG"
        if name in labels:
            raise ImagenetError(f"{csv_path}:{i}: {row[0]} listed twice")
        labels[name] = ilsvrc12.check_wnid(tokens[0], f"{csv_path}:{i}")
    return labels


def flatten_val_tree(data_root: Path) -> dict[str, str]:
    """Move val/<wnid>/<file> to val/<file>; returns {file: WNID}. The labels are saved first
    (in STATE_DIR) so that a killed flatten still knows the labels of files already moved."""
    root = Path(data_root)
    val_dir = root / ilsvrc12.VAL_DIR
    saved_path = root / STATE_DIR / VAL_TREE_LABELS
    labels: dict[str, str] = {}
    if saved_path.is_file():
        for line in read_caffe_lines(saved_path):
            name, _, wnid = line.partition(" ")
            labels[name] = wnid
    folders = [e for e in sorted(os.scandir(val_dir), key=lambda e: e.name)
               if e.is_dir() and not e.name.startswith(".")]
    problems = Mismatches(f"{val_dir}: val tree")
    for folder in folders:
        if not ilsvrc12.WNID_RE.match(folder.name):
            problems.add("folders that are not WNIDs", folder.name)
            continue
        for name in _visible_files(Path(folder.path)):
            if labels.get(name, folder.name) != folder.name:
                problems.add("images in two class folders", name)
            labels[name] = folder.name
    problems.raise_if_any()
    if not folders:
        if not saved_path.is_file():
            raise ImagenetError(f"{val_dir}: no class folders to take val labels from")
        return labels
    saved_path.parent.mkdir(parents=True, exist_ok=True)
    ilsvrc12.atomic_write_text(saved_path, "".join(f"{n} {w}\n" for n, w in sorted(labels.items())))
    for folder in folders:
        for name in _visible_files(Path(folder.path)):
            os.replace(Path(folder.path) / name, val_dir / name)
        os.rmdir(folder.path)
    return labels


# --------------------------------------------------------------------------- assembling


def _val_entries(data_root: Path, labels: dict[str, str], synsets: list[str], where: str
                 ) -> list[tuple[str, int]]:
    """val.txt entries for the flat val/ folder, checking files against labels."""
    val_dir = Path(data_root) / ilsvrc12.VAL_DIR
    if not val_dir.is_dir():
        raise ImagenetError(f"{val_dir}: no val folder (extract the val archive first)")
    index = ilsvrc12.labels_of(synsets)
    present = set(_visible_files(val_dir))
    problems = Mismatches(f"val labels from {where} do not match {val_dir}")
    entries = []
    for name in sorted(present):
        wnid = labels.get(name)
        if wnid is None:
            problems.add("val images with no label", name)
        elif wnid not in index:
            problems.add("labels outside the synsets of train/", f"{name}: {wnid}")
        else:
            entries.append((name, index[wnid]))
    for name in sorted(set(labels) - present):
        problems.add("labelled val images with no file", name)
    problems.raise_if_any()
    return entries


def check_listings(listings: Listings, data_root: Path, where: str, check_files: bool = True
                   ) -> list[str]:
    """Fail on labels outside the synsets, train labels that disagree with their folder and
    listing entries with no file; returns notes (e.g. files on disk that no listing names)."""
    root = Path(data_root)
    n = len(listings.synsets)
    problems = Mismatches(f"{where} does not match {root}")
    for path, label in listings.train:
        if not 0 <= label < n:
            problems.add("train labels outside the synsets", f"{path} {label}")
        elif path.split("/", 1)[0] != listings.synsets[label]:
            problems.add("train labels that disagree with their folder", f"{path} {label}")
    for path, label in listings.val:
        if not 0 <= label < n:
            problems.add("val labels outside the synsets", f"{path} {label}")
    notes: list[str] = []
    if check_files:
        for sub, entries in ((ilsvrc12.TRAIN_DIR, listings.train), (ilsvrc12.VAL_DIR, listings.val)):
            # One walk of the tree, then set lookups: a stat per entry cost ~60% of the stage
            # at 1.33 M images (benchmarks/fullcount.py, py-spy). An entry the walk does not
            # name as written (hidden, "./"-style) is still looked up on disk.
            files = _all_files(root / sub)
            listed = set()
            for path, _ in entries:
                listed.add(path)
                if path not in files and not (root / sub / path).is_file():
                    problems.add(f"{sub} listing entries with no file", f"{sub}/{path}")
            extra = len(files - listed)
            if extra:
                notes.append(f"{extra} files under {sub}/ are in no listing")
    problems.raise_if_any()
    return notes


def _all_files(folder: Path) -> set[str]:
    """Relative names of the files under `folder` (regular files and links to them; hidden
    names, our temporaries, left out). scandir's entry types need no stat per file."""
    out: set[str] = set()
    if not folder.is_dir():
        return out
    stack = [""]
    while stack:
        rel = stack.pop()
        prefix = f"{rel}/" if rel else ""
        with os.scandir(folder / rel if rel else folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(prefix + entry.name)
                elif entry.is_file():
                    out.add(prefix + entry.name)
    return out


def derive_listings(data_root: Path, *, devkit: Path | None = None,
                    val_solution: Path | None = None, val_tree: bool = False,
                    synset_words: Path | None = None) -> tuple[Listings, str, list[str]]:
    """Listings derived from the extracted tree plus one val-label source."""
    chosen = [s for s, on in (("devkit", devkit), ("val-solution", val_solution),
                              ("val-tree", val_tree)) if on]
    if len(chosen) != 1:
        raise ImagenetError("derive listings from exactly one of a devkit, a "
                            f"{ilsvrc12.KAGGLE_VAL_SOLUTION} or a val tree (got "
                            f"{', '.join(chosen) or 'none'})")
    root = Path(data_root)
    synsets, train, notes = derive_train(root)
    words: dict[str, str] = {}
    if devkit:
        labels, words = val_labels_from_devkit(Path(devkit))
        where = str(devkit)
    elif val_solution:
        labels = val_labels_from_solution(Path(val_solution))
        where = str(val_solution)
        beside = Path(val_solution).with_name(ilsvrc12.KAGGLE_SYNSET_MAPPING)
        if synset_words is None and beside.is_file():
            synset_words = beside
    else:
        labels = flatten_val_tree(root)
        where = f"{root / ilsvrc12.VAL_DIR} class folders"
    if synset_words is not None:
        words = ilsvrc12.read_synset_words(Path(synset_words))
    val = _val_entries(root, labels, synsets, where)
    return Listings(synsets, words, train, val), chosen[0], notes


def _diff(name: str, got: list, want: list, problems: Mismatches) -> None:
    if got == want:
        return
    got_set, want_set = set(got), set(want)
    for item in want:
        if item not in got_set:
            problems.add(f"{name} lines only in the aux tarball", repr(item))
    for item in got:
        if item not in want_set:
            problems.add(f"{name} lines only in the derived listing", repr(item))
    if got_set == want_set:
        problems.add(f"{name} lines in a different order", name)


def write_listings(data_root: Path, *, aux: Path | None = None, devkit: Path | None = None,
                   val_solution: Path | None = None, val_tree: bool = False,
                   synset_words: Path | None = None, check_files: bool = True
                   ) -> ListingsResult:
    """Write synsets.txt, synset_words.txt, train.txt and val.txt into `data_root`.

    With `aux`, Caffe's files are used (checked against the tree); if a derivation source is
    also given, the derived listings must equal them line for line. Without `aux`, they are
    derived (see the module docstring)."""
    root = Path(data_root)
    notes: list[str] = []
    derived: Listings | None = None
    source = ""
    if devkit or val_solution or val_tree:
        derived, source, notes = derive_listings(root, devkit=devkit, val_solution=val_solution,
                                                 val_tree=val_tree, synset_words=synset_words)
    if aux:
        listings = read_aux(Path(aux))
        notes += check_listings(listings, root, str(aux), check_files)
        if derived is not None:
            problems = Mismatches(f"listings derived from {source} differ from {aux}")
            _diff("synsets.txt", derived.synsets, listings.synsets, problems)
            _diff("train.txt", derived.train, listings.train, problems)
            _diff("val.txt", derived.val, listings.val, problems)
            problems.raise_if_any()
            source = f"aux, checked against {source}"
        else:
            source = "aux"
    elif derived is not None:
        listings = derived
    else:
        raise ImagenetError("no listing source: give the aux tarball, a devkit, a "
                            f"{ilsvrc12.KAGGLE_VAL_SOLUTION} or a val tree")
    paths = {name: root / name for name in ilsvrc12.LISTING_FILES}
    ilsvrc12.write_synsets(paths[ilsvrc12.SYNSETS_FILE], listings.synsets)
    if listings.words:
        ilsvrc12.write_synset_words(paths[ilsvrc12.SYNSET_WORDS_FILE], listings.synsets,
                                    listings.words)
    else:
        del paths[ilsvrc12.SYNSET_WORDS_FILE]
        notes.append("no synset words source (aux tarball, devkit, LOC_synset_mapping.txt or "
                     "--synset-words): synset_words.txt not written")
    ilsvrc12.write_listing(paths[ilsvrc12.TRAIN_LIST], listings.train)
    ilsvrc12.write_listing(paths[ilsvrc12.VAL_LIST], listings.val)
    counts = {"synsets": len(listings.synsets), "train": len(listings.train),
              "val": len(listings.val)}
    return ListingsResult(source=source, counts=counts, paths=paths, notes=notes)
