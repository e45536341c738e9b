"""data/ilsvrc12.py: the listing formats, checked against the files real Caffe was given."""
from __future__ import annotations

import pytest

from data import ilsvrc12
from data.errors import ImagenetError


def test_golden_listings_round_trip(golden, tmp_path):
    entries = ilsvrc12.read_listing(golden / "train.txt")
    assert entries[0] == ("n01440764/n01440764_4634.JPEG", 0)
    ilsvrc12.write_listing(tmp_path / "train.txt", entries)
    assert (tmp_path / "train.txt").read_bytes() == (golden / "train.txt").read_bytes()
    val = ilsvrc12.read_listing(golden / "val.txt")
    assert val[0] == ("ILSVRC2012_val_00000001.JPEG", 3)


def test_listing_splits_at_the_last_space(tmp_path):
    # convert_imageset.cpp: line.find_last_of(' ')
    assert ilsvrc12.parse_listing(["my dir/a b.JPEG 7"], "x") == [("my dir/a b.JPEG", 7)]
    with pytest.raises(ImagenetError, match=r"x:2: label 'seven' is not an integer"):
        ilsvrc12.parse_listing(["a.JPEG 1", "b.JPEG seven"], "x")
    with pytest.raises(ImagenetError, match=r"x:1: expected '<path> <label>'"):
        ilsvrc12.parse_listing(["lonely"], "x")


def test_synsets_must_be_sorted_wnids(tmp_path):
    ilsvrc12.write_synsets(tmp_path / "s.txt", ["n01440764", "n01443537"])
    assert ilsvrc12.read_synsets(tmp_path / "s.txt") == ["n01440764", "n01443537"]
    assert ilsvrc12.labels_of(["n01440764", "n01443537"]) == {"n01440764": 0, "n01443537": 1}
    with pytest.raises(ImagenetError, match="not ASCII-sorted"):
        ilsvrc12.parse_synsets(["n01443537", "n01440764"], "s.txt")
    with pytest.raises(ImagenetError, match=r"s.txt:1: 'tench' is not a WordNet id"):
        ilsvrc12.parse_synsets(["tench"], "s.txt")
    with pytest.raises(ImagenetError, match="duplicate"):
        ilsvrc12.parse_synsets(["n01440764", "n01440764"], "s.txt")


def test_synset_words_and_md5sums(tmp_path):
    words = {"n01440764": "tench, Tinca tinca"}
    ilsvrc12.write_synset_words(tmp_path / "w.txt", ["n01440764"], words)
    assert (tmp_path / "w.txt").read_text() == "n01440764 tench, Tinca tinca\n"
    assert ilsvrc12.read_synset_words(tmp_path / "w.txt") == words
    with pytest.raises(ImagenetError, match="no words for 1 synsets"):
        ilsvrc12.write_synset_words(tmp_path / "w.txt", ["n01443537"], words)
    sums = ilsvrc12.parse_md5sums("1d675b47d978889d74fa0da5fadfb00e *dir/ILSVRC2012_img_train.tar\n",
                                  "MD5SUMS")
    assert sums == {"ILSVRC2012_img_train.tar": ilsvrc12.KNOWN_ARCHIVES[
        "ILSVRC2012_img_train.tar"].md5}
    with pytest.raises(ImagenetError, match="MD5SUMS:1"):
        ilsvrc12.parse_md5sums("nothex  a.tar\n", "MD5SUMS")


def test_known_archives_match_caffe_facts():
    train = ilsvrc12.known_archive("ILSVRC2012_img_train.tar")
    val = ilsvrc12.known_archive("ILSVRC2012_img_val.tar")
    assert (train.md5, train.size) == ("1d675b47d978889d74fa0da5fadfb00e", 147_897_477_120)
    assert (val.md5, val.size) == ("29b22e2961454d5413ddabcf34fc5622", 6_744_924_160)
    assert ilsvrc12.known_archive("ILSVRC2012_devkit_t12.tar.gz").md5 == \
        "fa75699e90414af021442c21a62c3abf"
    assert ilsvrc12.known_archive("other.tar") is None
