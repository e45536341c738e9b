"""Image decoding exactly as Caffe's convert_imageset does it, plus the checks Caffe lacks.

Caffe (src/caffe/util/io.cpp, ReadImageToCVMat) decodes with `cv::imread(path, IMREAD_COLOR or
IMREAD_GRAYSCALE)` (EXIF orientation applied, format sniffed from the content, so a PNG named
.JPEG decodes) and resizes with `cv::resize(img, Size(width, height))` (INTER_LINEAR, aspect
ratio ignored) only when BOTH sizes are > 0. We call the same OpenCV functions, which reproduces
Caffe's records byte for byte (tests/data/test_convert_imageset.py checks every golden record).

What this module adds around that recipe:
- decompression bombs are refused from the header dimensions before any pixel is decoded;
- a truncated JPEG (no EOI marker) is reported so the caller can warn and count it: libjpeg
  decodes it anyway with the missing rows gray (128), which is what Caffe stores;
- an undecodable file raises ImageSkip with the reason, for the caller to count and report.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Refuse images with more pixels than this before decoding them: 2**28 pixels is 768 MiB of
# BGR, far beyond any real photo collection (ImageNet's largest is ~ 2**25) yet well below
# what would exhaust memory in every worker at once.
MAX_PIXELS_DEFAULT = 2**28

# Encodings to suggest when --encode_type names one OpenCV cannot write.
COMMON_ENCODINGS = ("jpg", "png", "bmp", "webp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# JPEG start-of-frame markers that carry the image size (C0-CF except DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8), 0xD8, 0xD9])
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
# Inside entropy-coded data 0xFF is always followed by 0x00 (stuffing) or RST0-7 (D0-D7);
# any other byte after 0xFF starts a real marker.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class ImageSkip(Exception):
    """The image cannot be converted; `reason` says why (Caffe logs and skips these)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, walking marker segments from SOI."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker are allowed
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == _JPEG_SOS:
            return None
        pos += 2 + length
    return None


def read_header(data: bytes) -> ImageHeader | None:
    """Format and dimensions from the first bytes of a JPEG or PNG (None for other formats or
    a header too damaged to read: OpenCV then decides, and fails on garbage)."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return ImageHeader("png", width, height)
    if data.startswith(_JPEG_SOI):
        dims = _jpeg_dimensions(data)
        if dims is not None:
            return ImageHeader("jpeg", *dims)
    return None


def jpeg_is_truncated(data: bytes) -> bool:
    """True when a JPEG ends before its EOI marker (libjpeg's "Premature end of JPEG file").

    Walks the marker segments (so an EXIF thumbnail's own EOI does not count), then the scans,
    where only a marker that is not stuffing or a restart ends the entropy-coded data.
    """
    if not data.startswith(_JPEG_SOI):
        return False
    if data.endswith(b"\xff\xd9"):
        return False  # the usual case: the file ends with EOI, nothing to walk
    pos, n = 2, len(data)
    while True:
        if pos + 2 > n:
            return True
        if data[pos] != 0xFF:
            return False  # corrupt header: not "truncated", OpenCV will reject or cope
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == _JPEG_EOI:
            return False
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return True
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        if marker == _JPEG_SOS:
            found = _JPEG_MARKER_IN_SCAN.search(data, pos)
            if found is None:
                return True
            pos = found.start()


def check_size(header: ImageHeader | None, max_pixels: int, path: str | Path) -> None:
    """Refuse a decompression bomb from its header alone."""
    if header is not None and header.width * header.height > max_pixels:
        raise ImageSkip(
            f"{header.format.upper()} header says {header.width}x{header.height} = "
            f"{header.width * header.height:,} pixels, over the limit of {max_pixels:,} "
            f"(refused without decoding: decompression bomb?)"
        )


@dataclass
class DecodedImage:
    """An image as Caffe's ReadImageToCVMat returns it: HxWx3 BGR or HxW gray, uint8."""

    pixels: np.ndarray
    truncated: bool
    file_bytes: bytes  # the original file, stored as-is by --encoded when no re-encode is needed


def load_image(
    path: str | Path,
    *,
    gray: bool = False,
    resize_height: int = 0,
    resize_width: int = 0,
    max_pixels: int = MAX_PIXELS_DEFAULT,
) -> DecodedImage:
    """Read, check and decode one image like Caffe's ReadImageToCVMat; raise ImageSkip if it
    cannot be converted."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageSkip(f"cannot read file: {err.strerror or err}") from None
    if not data:
        raise ImageSkip("empty file")
    check_size(read_header(data), max_pixels, path)
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    truncated = jpeg_is_truncated(data)
    # imdecode of the bytes we already hold gives imread's pixels (EXIF applied, format
    # sniffed; checked on every golden image) without reading the file twice. But OpenCV 5's
    # imdecode rejects a truncated JPEG that imread (like Caffe's OpenCV 4.6 imread) decodes
    # with gray rows, so those, and anything imdecode refuses, go through Caffe's own call.
    try:
        pixels = None if truncated else cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
        if pixels is None:
            pixels = cv2.imread(str(path), flag)
        if pixels is None:
            raise ImageSkip("OpenCV could not decode it (Caffe: \"Could not open or find file\")")
        if resize_height > 0 and resize_width > 0:
            # cv::resize(src, dst, cv::Size(width, height)): dsize is (width, height).
            pixels = cv2.resize(pixels, (resize_width, resize_height),
                                interpolation=cv2.INTER_LINEAR)
    except cv2.error as err:  # OpenCV throws on what it cannot handle: a counted skip
        raise ImageSkip(f"OpenCV failed on it: {getattr(err, 'err', '') or err}") from None
    except MemoryError:
        raise ImageSkip("not enough memory to decode or resize it") from None
    return DecodedImage(pixels, truncated, data)


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """HxWxC (or HxW gray) -> CxHxW, as Caffe's CVMatToDatum lays out Datum.data."""
    if pixels.ndim == 2:
        return pixels[np.newaxis]
    return pixels.transpose(2, 0, 1)


def encode_image(pixels: np.ndarray, encode_type: str) -> bytes:
    """cv::imencode("." + encode_type, img) with OpenCV's defaults (JPEG quality 95), as Caffe's
    ReadImageToDatum re-encodes."""
    try:
        ok, buf = cv2.imencode("." + encode_type, pixels)
    except cv2.error:  # an extension OpenCV has no encoder for
        ok = False
    if not ok:
        raise ImageSkip(f"OpenCV could not encode it as {encode_type!r}")
    return buf.tobytes()


def extension_matches(filename: str, encoding: str) -> bool:
    """Caffe's matchExt (io.cpp): case-insensitive extension == encoding, and jpg matches jpeg."""
    dot = filename.rfind(".")
    ext = (filename[dot + 1:] if dot >= 0 else filename).lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")
