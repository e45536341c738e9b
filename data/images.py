"""Image decoding exactly as Caffe's convert_imageset does it, plus the checks Caffe lacks.

Caffe (src/caffe/util/io.cpp, ReadImageToCVMat) decodes with `cv::imread(path, IMREAD_COLOR or
IMREAD_GRAYSCALE)` (EXIF orientation applied, format sniffed from the content, so a PNG named
.JPEG decodes) and resizes with `cv::resize(img, Size(width, height))` (INTER_LINEAR, aspect
ratio ignored) only when BOTH sizes are > 0. We call the same OpenCV functions (imdecode on the
file's bytes, which gives imread's pixels), which reproduces Caffe's records byte for byte
(tests/data/test_convert_imageset.py checks every golden record).

What this module adds around that recipe:
- decompression bombs are refused from the header dimensions before any pixel is decoded, in
  every format OpenCV decodes (data/image_headers.py);
- no path ever reaches OpenCV's file API, so a file name that is not UTF-8 is just a name;
- a truncated JPEG (no EOI marker) is reported so the caller can warn and count it: libjpeg
  decodes it anyway with the missing rows gray (128), which is what Caffe stores;
- an undecodable file raises ImageSkip with the reason, for the caller to count and report;
- DIGITS's other resize modes (crop, fill, half_crop: `resize`) beside Caffe's squash.
"""
from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data.errors import ImagenetError
# read_header and ImageHeader are this module's API too (callers read sizes from here).
from data.image_headers import ImageHeader, read_header  # noqa: F401

# Refuse images with more pixels than this before decoding them: 2**28 pixels is 768 MiB of
# BGR, far beyond any real photo collection (ImageNet's largest is ~ 2**25) yet well below
# what would exhaust memory in every worker at once.
MAX_PIXELS_DEFAULT = 2**28

# Encodings to suggest when --encode_type names one OpenCV cannot write.
COMMON_ENCODINGS = ("jpg", "png", "bmp", "webp")

# How an image becomes resize_height x resize_width (NVIDIA DIGITS's resize modes,
# digits/utils/image.py resize_image): "squash" is Caffe's (aspect ratio ignored) and the default.
SQUASH, CROP, FILL, HALF_CROP = "squash", "crop", "fill", "half_crop"
RESIZE_MODES = (SQUASH, CROP, FILL, HALF_CROP)
# fill / half_crop pad with uniform noise in [0, NOISE_HIGH) like DIGITS (np.random.randint(0,
# 255)), but seeded from the file's bytes: the same image always gets the same padding, so the
# records are the same for any worker count and on every rerun.
NOISE_HIGH = 255

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8), 0xD8, 0xD9])
# What libjpeg's file source feeds the decoder after the last byte of a truncated JPEG: a fake
# EOI marker, again on every further read (jdatasrc.c fill_input_buffer). Decoding from memory
# with as many EOIs behind the data as any segment could still ask for (a length field is 16
# bits) gives imread's pixels, gray rows included, without handing OpenCV a path.
_JPEG_EOF_PADDING = b"\xff\xd9" * (0xFFFF // 2 + 1)
# Inside entropy-coded data 0xFF is always followed by 0x00 (stuffing) or RST0-7 (D0-D7);
# any other byte after 0xFF starts a real marker.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class ImageSkip(Exception):
    """The image cannot be converted; `reason` says why (Caffe logs and skips these)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    """Refuse a decompression bomb from its header alone, in every format OpenCV decodes
    (data/image_headers.py), and a header OpenCV would refuse for having no size."""
    if header is None:
        return  # no decoder claims these bytes: OpenCV fails on them without decoding
    if not header.readable:
        raise ImageSkip(f"its {header.format.upper()} header gives no usable image size "
                        "(damaged or cut short)")
    if header.width * header.height > max_pixels:
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


def check_resize_mode(mode: str) -> str:
    """The mode itself, or ImagenetError listing the valid ones."""
    if mode not in RESIZE_MODES:
        raise ImagenetError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    return mode


def _round(x: float) -> int:
    """Python 2's round(), which DIGITS ran on: halves away from zero (Python 3 rounds them to
    even, which would move a centre crop by a pixel)."""
    return int(math.floor(x + 0.5))


def _cv_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    # cv::resize(src, dst, cv::Size(width, height)): dsize is (width, height).
    return cv2.resize(pixels, (max(width, 1), max(height, 1)), interpolation=cv2.INTER_LINEAR)


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NOISE_HIGH, shape, dtype=np.uint8)


def resize(pixels: np.ndarray, height: int, width: int, mode: str = SQUASH, *,
           noise_seed: int = 0) -> np.ndarray:
    """`pixels` (HxW or HxWxC, uint8) at height x width by `mode`, as DIGITS's resize_image
    defines the modes, with OpenCV's INTER_LINEAR (Caffe's resize) in place of scipy's bilinear:

    - squash: resize to exactly height x width, aspect ratio ignored (Caffe's convert_imageset);
    - crop: resize so the image covers the target keeping its aspect ratio, then cut the centre;
    - fill: resize so the image fits inside the target keeping its aspect ratio, then pad both
      sides of the short dimension with noise (an even padding: DIGITS rounds the image up);
    - half_crop: resize to the mean of the two ratios, cut the centre of the too-long dimension
      and pad the too-short one with noise: half the distortion of each of the others.
    An image whose aspect ratio already is the target's is squashed in every mode."""
    check_resize_mode(mode)
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels
    width_ratio, height_ratio = w / width, h / height
    if mode == SQUASH or width_ratio == height_ratio:
        return _cv_resize(pixels, height, width)
    wide = width_ratio > height_ratio  # relatively wider than the target
    if mode == CROP:
        if wide:
            rh, rw = height, _round(w / height_ratio)
        else:
            rh, rw = _round(h / width_ratio), width
        out = _cv_resize(pixels, rh, rw)
        return _centre(out, height, width, wide)
    if mode == FILL:
        if wide:
            rh, rw = max(1, _round(h / width_ratio)), width
            rh += (height - rh) % 2
        else:
            rh, rw = height, max(1, _round(w / height_ratio))
            rw += (width - rw) % 2
        out = _cv_resize(pixels, rh, rw)
    else:  # HALF_CROP
        ratio = (width_ratio + height_ratio) / 2.0
        rh, rw = max(1, _round(h / ratio)), max(1, _round(w / ratio))
        if wide:
            rh += (height - rh) % 2
        else:
            rw += (width - rw) % 2
        out = _centre(_cv_resize(pixels, rh, rw), min(rh, height), min(rw, width), wide)
    return _pad(out, height, width, wide, noise_seed)


def _centre(pixels: np.ndarray, height: int, width: int, wide: bool) -> np.ndarray:
    """Cut the centre of the dimension that is too long (DIGITS's rounding of the offset)."""
    if wide:
        start = _round((pixels.shape[1] - width) / 2.0)
        return pixels[:, start:start + width]
    start = _round((pixels.shape[0] - height) / 2.0)
    return pixels[start:start + height, :]


def _pad(pixels: np.ndarray, height: int, width: int, wide: bool, seed: int) -> np.ndarray:
    """Pad the dimension that is too short with noise, the same amount on both sides."""
    extra = pixels.shape[2:]
    if wide:
        pad = (height - pixels.shape[0]) // 2
        if pad <= 0:
            return pixels
        shape = (pad, width, *extra)
        axis = 0
    else:
        pad = (width - pixels.shape[1]) // 2
        if pad <= 0:
            return pixels
        shape = (height, pad, *extra)
        axis = 1
    noise = _noise((2, *shape), seed)
    return np.ascontiguousarray(np.concatenate((noise[0], pixels, noise[1]), axis=axis))


def noise_seed(data: bytes) -> int:
    """The seed of an image's padding noise: from its bytes, so it never depends on the order
    or the worker that decoded it."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def load_image(
    path: str | Path,
    *,
    gray: bool = False,
    resize_height: int = 0,
    resize_width: int = 0,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    resize_mode: str = SQUASH,
) -> DecodedImage:
    """Read, check and decode one image like Caffe's ReadImageToCVMat; raise ImageSkip if it
    cannot be converted. `resize_mode` (RESIZE_MODES, see resize) applies when both sizes are
    set; the default, squash, is Caffe's own resize."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageSkip(f"cannot read file: {err.strerror or err}") from None
    if not data:
        raise ImageSkip("empty file")
    check_size(read_header(data), max_pixels, path)
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    truncated = jpeg_is_truncated(data)
    # imdecode of the bytes we already hold gives imread's pixels (EXIF applied, format sniffed;
    # checked on every golden image and on truncations of every format) without reading the
    # file twice, and without giving OpenCV a path: its file API takes the name as UTF-8 and
    # crashed (SIGSEGV) on names that are not. A truncated JPEG, which imread (like Caffe's)
    # decodes with gray rows and OpenCV's memory source refuses, gets the fake EOIs libjpeg's
    # file source would have read.
    try:
        buffer = data + _JPEG_EOF_PADDING if truncated else data
        pixels = cv2.imdecode(np.frombuffer(buffer, dtype=np.uint8), flag)
        if pixels is None:
            raise ImageSkip("OpenCV could not decode it (Caffe: \"Could not open or find file\")")
        if resize_height > 0 and resize_width > 0:
            if resize_mode == SQUASH:
                # cv::resize(src, dst, cv::Size(width, height)): dsize is (width, height).
                pixels = cv2.resize(pixels, (resize_width, resize_height),
                                    interpolation=cv2.INTER_LINEAR)
            else:
                pixels = resize(pixels, resize_height, resize_width, resize_mode,
                                noise_seed=noise_seed(data))
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
