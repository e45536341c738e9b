"""data/listings.py: derived listings equal Caffe's aux files; mismatches fail loudly."""
from __future__ import annotations

import csv
import pickle
import tarfile
from pathlib import Path

import pytest

from data import extract as ex
from data import ilsvrc12
from data.errors import ImagenetError
from data.listings import derive_train, write_listings


def aux_files(aux_tar: Path) -> dict[str, bytes]:
    with tarfile.open(aux_tar) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                if m.name in ilsvrc12.LISTING_FILES}


def written(root: Path) -> dict[str, bytes]:
    return {n: (root / n).read_bytes() for n in ilsvrc12.LISTING_FILES if (root / n).exists()}


@pytest.fixture
def root(mini_tiny, tmp_path) -> Path:
    ex.extract_train(mini_tiny.train_tar, tmp_path)
    ex.extract_val(mini_tiny.val_tar, tmp_path)
    return tmp_path


def test_golden_train_tree_derives_caffes_train_txt(golden):
    synsets, entries, notes = derive_train(golden)
    assert synsets == sorted(p.name for p in (golden / "train").iterdir())
    assert ilsvrc12.format_listing(entries) == (golden / "train.txt").read_text()
    assert notes == []


def test_derived_from_devkit_equals_aux(mini_tiny, root):
    result = write_listings(root, devkit=mini_tiny.devkit_tar)
    assert written(root) == aux_files(mini_tiny.aux_tar)
    assert result.source == "devkit"
    assert result.counts == {"synsets": 3, "train": 12, "val": 6}


def test_devkit_folder_works_too(mini_tiny, root, tmp_path_factory):
    devkit_dir = tmp_path_factory.mktemp("devkit")
    ex.extract_archive(mini_tiny.devkit_tar, devkit_dir)
    write_listings(root, devkit=devkit_dir / ilsvrc12.DEVKIT_DIR)
    assert written(root) == aux_files(mini_tiny.aux_tar)


def test_ground_truth_ids_are_not_caffe_labels(mini_tiny):
    """The trap: reading ILSVRC2012_IDs as labels (ID - 1) gives a wrong val.txt."""
    ids = [int(x) for x in mini_tiny.ground_truth.read_text().split()]
    labels = [lab for _, lab in ilsvrc12.parse_listing(
        aux_files(mini_tiny.aux_tar)["val.txt"].decode().splitlines(), "val.txt")]
    assert [i - 1 for i in ids] != labels


def test_derived_from_kaggle_solution_equals_aux(mini_tiny, root):
    result = write_listings(root, val_solution=mini_tiny.val_solution)
    assert written(root) == aux_files(mini_tiny.aux_tar)  # words from LOC_synset_mapping.txt
    assert result.source == "val-solution"


def test_derived_from_sorted_val_tree_equals_aux(mini_tiny, root):
    val = root / "val"
    for name, label in ilsvrc12.parse_listing(
            aux_files(mini_tiny.aux_tar)["val.txt"].decode().splitlines(), "val.txt"):
        (val / mini_tiny.synsets[label]).mkdir(exist_ok=True)
        (val / name).rename(val / mini_tiny.synsets[label] / name)
    result = write_listings(root, val_tree=True, synset_words=mini_tiny.synset_mapping)
    assert written(root) == aux_files(mini_tiny.aux_tar)
    assert sorted(p.name for p in val.iterdir()) == sorted(
        ilsvrc12.VAL_NAME_FORMAT.format(i) for i in range(1, 7))  # flattened
    # A rerun (the flatten already done) still knows the labels.
    write_listings(root, val_tree=True, synset_words=mini_tiny.synset_mapping)
    assert written(root) == aux_files(mini_tiny.aux_tar)
    assert result.source == "val-tree"


def test_aux_is_read_without_extracting_or_unpickling(mini_tiny, root, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickled an aux file")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    result = write_listings(root, aux=mini_tiny.aux_tar, devkit=mini_tiny.devkit_tar)
    assert result.source == "aux, checked against devkit"
    assert written(root) == aux_files(mini_tiny.aux_tar)
    assert not list(root.rglob("*.pickle"))


def test_val_mismatches_are_counted_and_fail(mini_tiny, root):
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    (root / "val" / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"x")
    with pytest.raises(ImagenetError) as err:
        write_listings(root, devkit=mini_tiny.devkit_tar)
    msg = str(err.value)
    assert "1 val images with no label (e.g. ILSVRC2012_val_00000099.JPEG)" in msg
    assert "1 labelled val images with no file (e.g. ILSVRC2012_val_00000002.JPEG)" in msg
    assert "\n" not in msg
    assert not (root / "val.txt").exists()  # nothing written on failure


def test_label_outside_the_synsets_fails(mini_tiny, root, tmp_path_factory):
    bad = tmp_path_factory.mktemp("kaggle") / "LOC_val_solution.csv"
    rows = list(csv.reader(mini_tiny.val_solution.read_text().splitlines()))
    rows[1][1] = "n09999999 1 2 3 4"
    with open(bad, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    with pytest.raises(ImagenetError, match=r"1 labels outside the synsets of train/ \(e.g. "
                                            r"ILSVRC2012_val_\d+.JPEG: n09999999\)"):
        write_listings(root, val_solution=bad)


def test_aux_entry_with_no_file_fails(mini_tiny, root):
    first = sorted((root / "train" / mini_tiny.synsets[0]).iterdir())[0]
    first.unlink()
    with pytest.raises(ImagenetError, match=rf"1 train listing entries with no file \(e.g. "
                                            rf"train/{mini_tiny.synsets[0]}/{first.name}\)"):
        write_listings(root, aux=mini_tiny.aux_tar)
    # ... and derived listings disagree with the aux ones: reported, not papered over.
    with pytest.raises(ImagenetError, match="train.txt lines only in the aux tarball"):
        write_listings(root, aux=mini_tiny.aux_tar, devkit=mini_tiny.devkit_tar,
                       check_files=False)


def test_exactly_one_val_source(mini_tiny, root):
    with pytest.raises(ImagenetError, match="exactly one of"):
        write_listings(root, devkit=mini_tiny.devkit_tar, val_solution=mini_tiny.val_solution)
    with pytest.raises(ImagenetError, match="no listing source"):
        write_listings(root)


def test_non_wnid_folder_in_train_fails(root):
    (root / "train" / "not_a_class").mkdir()
    with pytest.raises(ImagenetError, match="1 folders that are not WNIDs"):
        derive_train(root)


def test_a_file_name_that_is_not_utf8_lists_and_reads_back(tmp_path):
    """A tree holding a Latin-1 name (caf\\xe9.JPEG) made the listing writer raise
    UnicodeEncodeError (a bug exit); its listing line holds the name's own bytes, as Caffe's
    would, and reads back to the same name."""
    import os

    wnid = tmp_path / "train" / "n01440764"
    wnid.mkdir(parents=True)
    name = os.fsdecode(b"caf\xe9.JPEG")
    (wnid / name).write_bytes(b"x")
    synsets, train, _ = derive_train(tmp_path)
    assert train == [(f"n01440764/{name}", 0)]
    listing = tmp_path / "train.txt"
    ilsvrc12.write_listing(listing, train)
    assert listing.read_bytes() == b"n01440764/caf\xe9.JPEG 0\n"
    assert ilsvrc12.read_listing(listing) == train
