"""data.images: Caffe's decode recipe, header dimensions, truncation, decompression bombs."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import images


def _jpeg(width: int = 40, height: int = 30, **params: int) -> bytes:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    flags = [cv2.IMWRITE_JPEG_QUALITY, 90]
    if params.get("progressive"):
        flags += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    ok, buf = cv2.imencode(".jpg", img, flags)
    return buf.tobytes()


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def test_header_dimensions_of_golden_images(golden: Path) -> None:
    # images_manifest.json: the stored (pre-EXIF) size Pillow read from each file.
    manifest = json.loads((golden / "images_manifest.json").read_text())
    assert len(manifest) >= 33
    for entry in manifest:
        header = images.read_header((golden / entry["file"]).read_bytes())
        if "pil_error" in entry:  # the corrupt file: no readable header either way
            assert header is None, entry["file"]
            continue
        assert header is not None, entry["file"]
        assert header.format == entry["pil_format"].lower(), entry["file"]
        assert [header.width, header.height] == entry["stored_size_wh"], entry["file"]


def test_header_of_synthetic_jpeg_png_and_unknown() -> None:
    assert images.read_header(_jpeg(40, 30)) == images.ImageHeader("jpeg", 40, 30)
    assert images.read_header(_jpeg(17, 9, progressive=1)) == images.ImageHeader("jpeg", 17, 9)
    assert images.read_header(_png_header(7, 5)) == images.ImageHeader("png", 7, 5)
    assert images.read_header(b"GIF89a....") is None
    assert images.read_header(b"\xff\xd8" + b"\x00" * 20) is None


def test_truncation_is_detected(golden: Path) -> None:
    assert images.jpeg_is_truncated((golden / "bad" / "truncated_0002.JPEG").read_bytes())
    assert not images.jpeg_is_truncated((golden / "bad" / "good_0001.JPEG").read_bytes())
    for path in sorted((golden / "train").rglob("*.JPEG")):
        assert not images.jpeg_is_truncated(path.read_bytes()), path
    full = _jpeg(64, 48, progressive=1)
    assert not images.jpeg_is_truncated(full)
    assert not images.jpeg_is_truncated(full + b"\x00\x00")  # padding after EOI: walked, fine
    assert images.jpeg_is_truncated(full[: len(full) * 2 // 3])
    assert images.jpeg_is_truncated(full[:2])
    assert not images.jpeg_is_truncated(_png_header(3, 3))


def test_decode_matches_caffes_recipe(golden: Path) -> None:
    path = golden / "train" / "n01494475" / "n01494475_4227.JPEG"  # EXIF orientation 6
    img = images.load_image(path, resize_height=20, resize_width=30)
    ref = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (30, 20))
    assert img.pixels.shape == (20, 30, 3) and np.array_equal(img.pixels, ref)
    assert not img.truncated and img.file_bytes == path.read_bytes()
    gray = images.load_image(path, gray=True)
    assert np.array_equal(gray.pixels, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    assert images.to_chw(gray.pixels).shape == (1, 500, 375)  # upright: rotated by EXIF
    only_height = images.load_image(path, resize_height=20)  # Caffe resizes only with both
    assert only_height.pixels.shape == (500, 375, 3)


def test_truncated_jpeg_decodes_with_gray_rows(golden: Path) -> None:
    img = images.load_image(golden / "bad" / "truncated_0002.JPEG")
    assert img.truncated and img.pixels.shape == (375, 500, 3)
    assert (img.pixels[-1] == 128).all()  # missing rows: gray, as libjpeg fills them


def test_unreadable_images_are_skipped_with_a_reason(golden: Path, tmp_path: Path) -> None:
    with pytest.raises(images.ImageSkip, match="could not decode"):
        images.load_image(golden / "bad" / "corrupt_0003.JPEG")
    with pytest.raises(images.ImageSkip, match="cannot read"):
        images.load_image(tmp_path / "missing.JPEG")
    (tmp_path / "empty.JPEG").write_bytes(b"")
    with pytest.raises(images.ImageSkip, match="empty"):
        images.load_image(tmp_path / "empty.JPEG")


def test_decompression_bombs_refused_from_the_header(tmp_path: Path) -> None:
    # A PNG header claiming 100000 x 100000 with no pixel data behind it: refused by size,
    # before OpenCV could try to allocate 30 GB.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000) + b"\x00" * 64)
    with pytest.raises(images.ImageSkip, match="100000x100000.*decompression bomb"):
        images.load_image(bomb)
    # A real JPEG over a (lowered) limit is refused the same way; under it, it decodes.
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg(40, 30))
    with pytest.raises(images.ImageSkip, match="40x30 = 1,200 pixels, over the limit of 1,000"):
        images.load_image(photo, max_pixels=1000)
    assert images.load_image(photo, max_pixels=1200).pixels.shape == (30, 40, 3)


def test_extension_matching_like_caffe() -> None:
    assert images.extension_matches("a/b.JPEG", "jpg")
    assert images.extension_matches("a/b.jpg", "JPG")
    assert images.extension_matches("x.png", "png")
    assert not images.extension_matches("x.png", "jpg")
    assert not images.extension_matches("x.jpg", "jpeg")  # Caffe only maps jpg -> jpeg
