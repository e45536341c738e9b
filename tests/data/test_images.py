"""data.images: Caffe's decode recipe, header dimensions, truncation, decompression bombs."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import image_bombs
import numpy as np
import pytest

from data import image_headers, images


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
    assert images.read_header(b"GIF89a\x03\x00\x02\x00") == images.ImageHeader("gif", 3, 2)
    assert images.read_header(b"not an image at all") is None
    # OpenCV's JPEG signature is FF D8 FF: FF D8 then anything else is no JPEG to it either.
    assert images.read_header(b"\xff\xd8" + b"\x00" * 20) is None
    # Claimed by a decoder, but no size in it: refused like OpenCV's validateInputImageSize.
    assert images.read_header(b"\xff\xd8\xff\xd9") == images.ImageHeader("jpeg", 0, 0)
    assert images.read_header(b"BM" + b"\x00" * 40) == images.ImageHeader("bmp", 0, 0)


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


# Every extension this OpenCV build writes, colour and gray where the format takes both.
ENCODABLE = [("jpg", 3), ("jpg", 1), ("png", 3), ("png", 1), ("bmp", 3), ("bmp", 1),
             ("tiff", 3), ("tiff", 1), ("webp", 3), ("avif", 3), ("jp2", 3), ("gif", 3),
             ("hdr", 3), ("ras", 3), ("ppm", 3), ("pgm", 1), ("pbm", 1), ("pam", 3), ("pnm", 1),
             ("pfm", 3), ("pfm", 1)]


@pytest.mark.parametrize("ext,channels", ENCODABLE, ids=lambda v: str(v))
def test_header_size_of_every_format_opencv_writes(ext: str, channels: int) -> None:
    """data.image_headers reads the size OpenCV's own decoder reads, format by format."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3)[:2 if channels == 1 else 3], np.uint8)
    ok, buf = cv2.imencode("." + ext, img)
    assert ok
    header = images.read_header(buf.tobytes())
    assert header is not None and (header.width, header.height) == (53, 37), header
    assert header.format in image_headers.FORMATS


def test_every_opencv_decoder_has_a_header_reader() -> None:
    """The formats whose sizes are read are the decoders this OpenCV build registers: a new
    codec in an OpenCV upgrade fails here instead of slipping past the bomb limit."""
    info = cv2.getBuildInformation()
    section = info[info.index("Media I/O"):info.index("Video I/O")]
    built = {name.strip() for name, _, value in (line.partition(":") for line in
                                                 section.splitlines()[1:])
             if value.split() and value.split()[0] != "NO"}
    known = {"ZLib", "JPEG", "WEBP", "AVIF", "PNG", "TIFF", "JPEG 2000", "GIF", "HDR",
             "SUNRASTER", "PXM", "PFM", "SIMD Support Request", "SIMD Support",
             "Metadata Support"}
    assert built <= known, f"OpenCV decodes formats data/image_headers.py does not read: " \
                           f"{sorted(built - known)}"
    assert set(image_headers.FORMATS) == {"bmp", "gif", "avif", "hdr", "jpeg", "webp", "sunras",
                                          "pnm", "pam", "pfm", "tiff", "png", "jp2", "j2k"}


@pytest.mark.parametrize("name", sorted(image_bombs.BOMBS))
def test_decompression_bomb_refused_in_every_format(name: str, tmp_path: Path) -> None:
    """A 5000x4000 header in a file of a few hundred bytes, in each format and variant OpenCV
    decodes, against a limit of 10 million pixels (a WebP side stops at 16384, so the default
    limit of 2**28 cannot be passed in every format): refused from the header alone. At the
    default limit an RLE BMP of 20000x20000 is 1.2 KB and would decode to 1.2 GB
    (tests/flows/test_bad_input.py)."""
    build, fmt = image_bombs.BOMBS[name]
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(build(5000, 4000))
    assert len(path.read_bytes()) < 2000
    assert images.read_header(path.read_bytes()) == images.ImageHeader(fmt, 5000, 4000)
    with pytest.raises(images.ImageSkip, match=f"{fmt.upper()} header says 5000x4000 = "
                       "20,000,000 pixels, over the limit of 10,000,000.*decompression bomb"):
        images.load_image(path, max_pixels=10_000_000)
    small = tmp_path / f"small.{fmt}"  # under the limit the same builder's size is read too
    small.write_bytes(build(40, 30))
    assert images.read_header(small.read_bytes()) == images.ImageHeader(fmt, 40, 30)


def test_bombs_are_what_opencv_would_allocate(tmp_path: Path) -> None:
    """The oracle for the cases above: OpenCV itself, with its own pixel limit lowered below
    the bombs' size, reads each header as that size (its validateInputImageSize fires), so
    every bomb is one OpenCV would otherwise decode at full size."""
    script = (
        "import sys, cv2, numpy as np, image_bombs\n"
        "for name, (build, _) in sorted(image_bombs.BOMBS.items()):\n"
        "    try:\n"
        "        cv2.imdecode(np.frombuffer(build(3000, 2000), np.uint8), cv2.IMREAD_COLOR)\n"
        "        print(name, 'no-limit')\n"
        "    except cv2.error as err:\n"
        "        print(name, 'limit' if 'CV_IO_MAX_IMAGE_PIXELS' in str(err) else 'other')\n")
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000000",
           "PYTHONPATH": str(Path(image_bombs.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    seen = dict(line.split() for line in out.splitlines())
    assert seen == {name: "limit" for name in image_bombs.BOMBS}


def test_non_utf8_file_names_never_reach_opencv(tmp_path: Path) -> None:
    """A Latin-1 name OpenCV could not decode through the first path used to be retried with
    cv2.imread(str(path)), which crashed the process (SIGSEGV) on the surrogates."""
    folder = os.fsencode(tmp_path)
    junk = os.fsdecode(folder + b"/caf\xe9.jpg")
    Path(junk).write_bytes(b"not an image at all")
    with pytest.raises(images.ImageSkip, match="could not decode"):
        images.load_image(junk)
    cut = os.fsdecode(folder + b"/trunc\xe9.jpg")
    full = _jpeg(64, 48)
    Path(cut).write_bytes(full[: len(full) * 2 // 3])
    img = images.load_image(cut)
    assert img.truncated and img.pixels.shape == (48, 64, 3)


def test_truncated_jpegs_decode_from_memory_as_imread_decodes_them(tmp_path: Path) -> None:
    """Caffe's imread decodes a cut JPEG with gray rows; imdecode of the same bytes refuses it.
    The fake EOIs give imread's pixels exactly, at every cut of baseline, progressive and
    restart-marker JPEGs (the comparison is the one place a path goes to OpenCV: an ASCII one)."""
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.integers(0, 256, (61, 83, 3), np.uint8), (5, 5), 0)
    path = tmp_path / "cut.jpg"
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]):
        data = cv2.imencode(".jpg", img, params)[1].tobytes()
        for cut in range(100, len(data), max(1, len(data) // 25)):
            path.write_bytes(data[:cut])
            want = cv2.imread(str(path), cv2.IMREAD_COLOR)
            try:
                got = images.load_image(path).pixels
            except images.ImageSkip:
                got = None
            assert (want is None) == (got is None), (params, cut)
            assert want is None or np.array_equal(want, got), (params, cut)


def test_extension_matching_like_caffe() -> None:
    assert images.extension_matches("a/b.JPEG", "jpg")
    assert images.extension_matches("a/b.jpg", "JPG")
    assert images.extension_matches("x.png", "png")
    assert not images.extension_matches("x.png", "jpg")
    assert not images.extension_matches("x.jpg", "jpeg")  # Caffe only maps jpg -> jpeg
