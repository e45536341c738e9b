"""data.image_folder: a folder of class folders -> Caffe's train.txt / val.txt and labels.txt, with a
clear outcome for each awkward thing a real photo folder holds."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data import image_folder as f
from data.errors import ImagenetError


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> f.SampleFolder:
    return f.make_image_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=9)


def _copy(sample: f.SampleFolder, tmp_path: Path) -> Path:
    dst = tmp_path / "photos"
    shutil.copytree(sample.folder, dst)
    return dst


def test_messy_folder_gives_listings_and_a_note_for_each_oddity(sample, tmp_path) -> None:
    result = f.write_folder_listings(tmp_path / "root", sample.folder, val_percent=25, seed=0)
    # sorted class names (code point order), the empty folder left out
    assert result.classes == ["circle", "lonely", "rayé", "square", "triangle"]
    labels = (tmp_path / "root" / "labels.txt").read_text(encoding="utf-8")
    assert labels == "circle\nlonely\nrayé\nsquare\ntriangle\n"
    notes = "\n".join(result.notes)
    assert "1 class has a single image (lonely): it is in train.txt" in notes
    assert "1 class folder holds no images: left out of labels.txt (empty)" in notes
    assert "ignored 1 file outside any class folder: notes.txt" in notes
    assert "ignored 1 file without an image extension: circle/Thumbs.db" in notes
    assert "ignored 1 hidden file or folder: circle/.DS_Store" in notes
    # every image once, in the class of its top-level folder (nested folders included)
    listed = result.train + result.val
    assert sorted(p for p, _ in listed) == sorted(p for ps in sample.classes.values() for p in ps)
    assert not {p for p, _ in result.train} & {p for p, _ in result.val}
    for path, label in listed:
        assert path.split("/", 1)[0] == result.classes[label]
    assert any("/more/" in p for p, _ in listed) and any(" (" in p for p, _ in listed)
    # stratified: every class of two or more images has val images, 25% rounded as DIGITS does
    for label, name in enumerate(result.classes):
        n = len(sample.classes[name])
        got = sum(lab == label for _, lab in result.val)
        assert got == f.split_counts(n, 25)[1], name
    # Caffe's listing format, sorted by path, UTF-8
    train_txt = (tmp_path / "root" / "train.txt").read_text(encoding="utf-8").splitlines()
    assert train_txt == [f"{p} {label}" for p, label in sorted(result.train)]
    assert result.roots == {"train": sample.folder, "val": sample.folder}
    assert result.counts == {"classes": 5, "train": len(result.train), "val": len(result.val),
                             "ignored": 3, "empty_classes": 1}


@pytest.mark.parametrize("size, want", [(1, (1, 0)), (2, (1, 1)), (3, (2, 1)), (4, (3, 1)),
                                        (10, (8, 2)), (100, (75, 25))])
def test_split_counts_follow_digits(size, want) -> None:
    assert f.split_counts(size, 25) == want


def test_split_is_seeded_and_adding_images_moves_few(sample, tmp_path) -> None:
    a = f.folder_listings(sample.folder, val_percent=25, seed=0)
    assert f.folder_listings(sample.folder, val_percent=25, seed=0).val == a.val
    assert f.folder_listings(sample.folder, val_percent=25, seed=1).val != a.val
    folder = _copy(sample, tmp_path)
    for i in range(3):  # three more circles
        shutil.copy(folder / "circle" / "IMG_0000.jpg", folder / "circle" / f"new_{i}.jpg")
    b = f.folder_listings(folder, val_percent=25, seed=0)
    circle = b.classes.index("circle")
    assert [e for e in b.val if e[1] != circle] == [e for e in a.val if e[1] != circle]
    before = {p for p, lab in a.val if lab == circle}
    after = {p for p, lab in b.val if lab == circle}
    assert len(before - after) <= 1  # the others stay where they were


def test_train_and_val_folders_are_used_as_they_are(sample, tmp_path) -> None:
    folder = tmp_path / "split"
    for split, picks in (("train", slice(0, 6)), ("val", slice(6, None))):
        for name in ("circle", "square"):
            for rel in sample.classes[name][picks]:
                dst = folder / split / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(sample.folder / rel, dst)
    (folder / "train" / "triangle").mkdir()
    shutil.copy(sample.folder / sample.classes["triangle"][0], folder / "train" / "triangle")
    result = f.write_folder_listings(tmp_path / "root", folder)
    assert result.classes == ["circle", "square", "triangle"]
    assert result.roots == {"train": folder / "train", "val": folder / "val"}
    assert all((folder / "val" / p).is_file() for p, _ in result.val)
    assert any("1 class has no val images (triangle)" in n for n in result.notes)
    with pytest.raises(ImagenetError, match="used as they are: leave val_percent out"):
        f.folder_listings(folder, val_percent=20)
    (folder / "val" / "hexagon").mkdir()
    shutil.copy(sample.folder / sample.classes["circle"][0], folder / "val" / "hexagon")
    with pytest.raises(ImagenetError, match="has no images for: hexagon"):
        f.folder_listings(folder)


def test_folders_that_cannot_be_a_dataset_fail_in_one_line(sample, tmp_path) -> None:
    with pytest.raises(ImagenetError, match="no such folder"):
        f.folder_listings(tmp_path / "nothing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ImagenetError, match="not a folder"):
        f.folder_listings(tmp_path / "file.jpg")
    one = tmp_path / "one"
    (one / "cats").mkdir(parents=True)
    (one / "dogs").mkdir()
    shutil.copy(sample.folder / sample.classes["circle"][0], one / "cats" / "a.jpg")
    with pytest.raises(ImagenetError, match="1 class folders with images .cats.; a classifier "
                                            "needs at least 2"):
        f.folder_listings(one)
    shutil.copy(sample.folder / sample.classes["circle"][0], one / "dogs" / "b.jpg")
    with pytest.raises(ImagenetError, match="no image is left for validation"):
        f.folder_listings(one)
    with pytest.raises(ImagenetError, match="between 0 and 100"):
        f.folder_listings(sample.folder, val_percent=100)


def test_names_a_listing_cannot_hold_and_names_that_are_not_utf8(sample, tmp_path) -> None:
    folder = _copy(sample, tmp_path)
    shutil.copy(folder / "circle" / "IMG_0000.jpg", folder / "circle" / "two\nlines.jpg")
    raw = os.fsencode(folder / "square") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    shutil.copy(folder / "square" / "IMG_0000.jpg", raw)
    result = f.write_folder_listings(tmp_path / "root", folder, val_percent=25)
    assert any("1 file whose name holds a line break" in n and "two\\nlines.jpg" in n
               for n in result.notes)
    listing = (tmp_path / "root" / "train.txt").read_bytes() + \
        (tmp_path / "root" / "val.txt").read_bytes()
    assert b"square/caf\xe9.jpg " in listing  # the name's own bytes, as convert reads them


def test_fingerprint_and_listing_digest_follow_the_files(sample, tmp_path) -> None:
    folder = _copy(sample, tmp_path)
    first = f.fingerprint(folder)
    assert f.fingerprint(folder) == first
    shutil.copy(folder / "circle" / "IMG_0000.jpg", folder / "circle" / "extra.jpg")
    assert f.fingerprint(folder) != first
    result = f.write_folder_listings(tmp_path / "root", folder, val_percent=25)
    listing = result.paths["train.txt"]
    digest = f.listing_digest(listing, folder)
    assert f.listing_digest(listing, folder) == digest
    some = folder / result.train[0][0]
    some.write_bytes(some.read_bytes() + b"\0")  # replaced in place: same name, other bytes
    assert f.listing_digest(listing, folder) != digest


@pytest.mark.parametrize("ext, fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".png", "PNG"),
                                      (".bmp", "BMP"), (".ppm", "PPM"), (".tif", "TIFF"),
                                      (".webp", "WEBP"), (".gif", "GIF"), (".jp2", "JPEG2000")])
def test_image_extensions_are_formats_opencv_decodes(ext, fmt) -> None:
    assert ext in f.IMAGE_EXTENSIONS
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9, 3), 77, np.uint8)).save(buf, fmt)
    assert cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR).shape == (6, 9, 3)


def test_sample_folder_is_reproducible(tmp_path) -> None:
    a = f.make_image_folder(tmp_path / "a", per_class=3)
    b = f.make_image_folder(tmp_path / "b", per_class=3)
    files = sorted(p.relative_to(a.folder) for p in a.folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.folder) for p in b.folder.rglob("*") if p.is_file())
    assert all((a.folder / p).read_bytes() == (b.folder / p).read_bytes() for p in files)
