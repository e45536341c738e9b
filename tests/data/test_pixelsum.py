"""data/pixelsum.py: the sums a conversion keeps give compute_image_mean's file bit for bit."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from data import pixelsum
from data.convert import convert_imageset
from data.mean import compute_image_mean, mean_from_sum


def _images(folder: Path, n: int) -> Path:
    """n small photos of different sizes (so the resize matters) and a listing of them."""
    rng = np.random.default_rng(5)
    lines = []
    for i in range(n):
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.jpg"), img)
        lines.append(f"img{i}.jpg {i % 3}\n")
    listing = folder / "list.txt"
    listing.write_text("".join(lines))
    return listing


@pytest.mark.parametrize("gray", [False, True])
def test_sum_from_conversion_gives_the_mean_file_bit_for_bit(tmp_path: Path, gray: bool) -> None:
    listing = _images(tmp_path, 11)
    db = tmp_path / "db"
    result = convert_imageset(tmp_path, listing, db, resize_height=12, resize_width=10,
                              gray=gray, workers=2, pixel_sum=True)
    assert result.pixel_sum is not None and result.pixel_sum.shape == (1 if gray else 3, 12, 10)
    saved = pixelsum.load(pixelsum.save(pixelsum.sum_path(db), result.pixel_sum, result.count,
                                        result.digest))
    assert saved is not None and saved.digest == result.digest and saved.count == 11
    fresh = compute_image_mean(db, tmp_path / "read.binaryproto")
    free = mean_from_sum(saved, tmp_path / "free.binaryproto")
    read = (tmp_path / "read.binaryproto").read_bytes()
    assert (tmp_path / "free.binaryproto").read_bytes() == read
    assert free.channel_means == fresh.channel_means and free.count == fresh.count


def test_no_sum_where_records_are_not_one_raw_size(tmp_path: Path) -> None:
    listing = _images(tmp_path, 3)
    kept = convert_imageset(tmp_path, listing, tmp_path / "a", pixel_sum=True)  # no resize
    encoded = convert_imageset(tmp_path, listing, tmp_path / "b", resize_height=8,
                               resize_width=8, encoded=True, encode_type="png", pixel_sum=True)
    assert kept.pixel_sum is None and encoded.pixel_sum is None


def test_unreadable_sums_file_reads_as_none(tmp_path: Path) -> None:
    bad = tmp_path / "x.pixel-sum.npz"
    bad.write_bytes(b"not a zip")
    assert pixelsum.load(bad) is None and pixelsum.load(tmp_path / "missing.npz") is None


def test_conversion_checks_free_space_first(tmp_path: Path, monkeypatch) -> None:
    import shutil as real_shutil

    from data import download
    from data.errors import ImagenetError

    listing = _images(tmp_path, 4)
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download.shutil, "disk_usage",
                        lambda path: usage._replace(free=100_000))
    with pytest.raises(ImagenetError, match=r"not enough free space for converting 4 images .*"
                       r"estimated .* GiB.*need \d[\d,]* bytes, 100,000 free"):
        convert_imageset(tmp_path, listing, tmp_path / "db", resize_height=256,
                         resize_width=256)
    assert not (tmp_path / "db").exists()


def test_save_removes_what_a_killed_writer_left(tmp_path):
    """A writer killed between its temporary and the rename leaves `.<name>.<pid>-<hex>.tmp`
    (data.atomic); the next save (the rerun's) removes it."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    target = tmp_path / "db.pixel-sum.npz"
    left = tmp_path / f".{target.name}.{dead}-0123abcd.tmp"
    left.write_bytes(b"half")
    pixelsum.save(target, np.zeros((3, 2, 2)), 0, "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_sum_past_65793_records_is_caffes_running_sum(tmp_path: Path, pool: str) -> None:
    """80,000 bright records: Caffe's float32 sums pass 2**24 near record 74,000 and round from
    there, in an order-dependent way. The sums the conversion keeps (any worker pool) give the
    file compute-image-mean writes, and both are Caffe's sequential float32 sums."""
    rng = np.random.default_rng(11)
    shape = (2, 3, 3)  # H, W, C
    pictures = rng.integers(200, 256, (7, *shape), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), picture)
    n = 80_000
    order = rng.integers(0, len(pictures), n)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"p{k}.png 0\n" for k in order))
    db = tmp_path / "db"
    result = convert_imageset(tmp_path, listing, db, resize_height=2, resize_width=3,
                              workers=2, pool=pool, pixel_sum=True, commit_every=20_000)
    assert result.count == n and result.pixel_sum is not None
    records = pictures.transpose(0, 3, 1, 2).reshape(len(pictures), -1)[order]
    running = np.cumsum(records.astype(np.float32), axis=0, dtype=np.float32)[-1]
    caffe = (running / np.float32(n)).reshape(3, 2, 3)
    exact = (records.astype(np.float64).sum(0).astype(np.float32) / np.float32(n)).reshape(3, 2, 3)
    assert not np.array_equal(caffe, exact)  # past 2**24 the two sums differ
    free = mean_from_sum(pixelsum.SavedSum(result.pixel_sum, result.count, result.digest),
                         tmp_path / "free.binaryproto")
    read = compute_image_mean(db, tmp_path / "read.binaryproto")
    assert np.array_equal(free.mean, caffe) and np.array_equal(read.mean, caffe)
    assert (tmp_path / "free.binaryproto").read_bytes() == \
        (tmp_path / "read.binaryproto").read_bytes()


def test_a_sums_file_of_the_old_exact_format_is_not_used(tmp_path: Path) -> None:
    """Version 1 kept exact float64 sums, which are not Caffe's past 65,793 records: the mean
    stage reads the LMDB instead of trusting them."""
    import io

    buf = io.BytesIO()
    np.savez(buf, version=np.int64(1), total=np.zeros((3, 2, 2), np.float64),
             count=np.int64(4), digest=np.str_("d"))
    old = tmp_path / "db.pixel-sum.npz"
    old.write_bytes(buf.getvalue())
    assert pixelsum.load(old) is None
    assert pixelsum.load(pixelsum.save(old, np.zeros((3, 2, 2), np.float32), 4, "d")) is not None
