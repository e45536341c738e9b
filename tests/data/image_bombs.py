"""Small files whose headers ask for a large image, one per format OpenCV decodes.

Importable as `image_bombs` (pyproject.toml puts tests/data on pytest's pythonpath). Each
builder returns the bytes of a file of `width` x `height` that OpenCV's decoder accepts up to
its size check (tests run them through OpenCV with OPENCV_IO_MAX_IMAGE_PIXELS lowered to prove
it), while holding almost no pixel data: the shape of a decompression bomb.
"""
from __future__ import annotations

import struct
import zlib
from typing import Callable

import cv2
import numpy as np


def _small(ext: str, params: list[int] | None = None) -> bytes:
    img = np.full((32, 32, 3), 90, np.uint8)  # OpenJPEG encodes nothing smaller
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def png(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    chunk = lambda c: struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(idat) + chunk(b"IEND")


def jpeg(width: int, height: int) -> bytes:
    data = bytearray(_small(".jpg"))
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def _bmp(width: int, height: int, bpp: int, compression: int, pixels: bytes) -> bytes:
    palette = bytes(4 * (1 << bpp))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(pixels),
                       2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette \
        + pixels


def bmp_rle8(width: int, height: int) -> bytes:
    return _bmp(width, height, 8, 1, b"\x00\x01")  # RLE8: end of bitmap at once


def bmp_rle4(width: int, height: int) -> bytes:
    return _bmp(width, height, 4, 2, b"\x00\x01")


def bmp_rgb(width: int, height: int) -> bytes:
    return _bmp(width, -height, 8, 0, b"\x00" * 64)  # top-down: negative height


def bmp_os2(width: int, height: int) -> bytes:
    """The OS/2 1.x core header (12 bytes, 16-bit sizes)."""
    palette = bytes(3 * 256)
    offset = 14 + 12 + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset)
            + struct.pack("<IHHHH", 12, width, height, 1, 8) + palette + bytes(64))


def gif(width: int, height: int) -> bytes:
    # One 1x1 frame (LZW: clear code, the pixel, end code) on a width x height canvas.
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b")


def webp_vp8x(width: int, height: int) -> bytes:
    """An animated WebP: the canvas comes from VP8X, the one frame is 32x32."""
    frame = _small(".webp")  # RIFF....WEBPVP8L....
    bitstream = frame[12:]
    anmf = struct.pack("<3s3s3s3s3sB", b"\0\0\0", b"\0\0\0", (31).to_bytes(3, "little"),
                       (31).to_bytes(3, "little"), (100).to_bytes(3, "little"), 0) + bitstream
    chunks = (b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0])
              + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
              + b"ANIM" + struct.pack("<IIH", 6, 0, 0)
              + b"ANMF" + struct.pack("<I", len(anmf)) + anmf + b"\0" * (len(anmf) & 1))
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def webp_vp8l(width: int, height: int) -> bytes:
    data = bytearray(_small(".webp"))  # lossless: RIFF....WEBPVP8L<size><0x2f><14+14 bits>
    bits = struct.unpack_from("<I", data, 21)[0] & ~((1 << 28) - 1)
    struct.pack_into("<I", data, 21, bits | (width - 1) | (height - 1) << 14)
    return bytes(data)


def webp_vp8(width: int, height: int) -> bytes:
    data = bytearray(_small(".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]))  # lossy: VP8 chunk
    assert data[12:16] == b"VP8 "
    struct.pack_into("<HH", data, 26, width, height)
    return bytes(data)


def tiff(width: int, height: int, big_endian: bool = False) -> bytes:
    o = ">" if big_endian else "<"
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 64)]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    entries[5] = (273, 4, data_at)
    out = (b"MM\0*" if big_endian else b"II*\0") + struct.pack(o + "I", ifd_at)
    out += struct.pack(o + "H", len(entries))
    for tag, kind, value in entries:
        field = struct.pack(o + ("H" if kind == 3 else "I"), value).ljust(4, b"\0")
        out += struct.pack(o + "HHI", tag, kind, 1) + field
    return out + b"\0\0\0\0" + bytes(64)


def tiff_be(width: int, height: int) -> bytes:
    return tiff(width, height, big_endian=True)


def bigtiff(width: int, height: int) -> bytes:
    entries = [(256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 16, 0), (277, 3, 1), (278, 16, height), (279, 16, 64)]
    ifd_at = 16
    data_at = ifd_at + 8 + 20 * len(entries) + 8
    entries[5] = (273, 16, data_at)
    out = b"II+\0" + struct.pack("<HHQ", 8, 0, ifd_at) + struct.pack("<Q", len(entries))
    for tag, kind, value in entries:
        field = struct.pack("<" + ("H" if kind == 3 else "Q"), value).ljust(8, b"\0")
        out += struct.pack("<HHQ", tag, kind, 1) + field
    return out + bytes(8) + bytes(64)


def ppm(width: int, height: int) -> bytes:
    return b"P6\n# a comment\n%d %d\n255\n" % (width, height) + bytes(64)


def pgm_ascii(width: int, height: int) -> bytes:
    return b"P2 %d\n%d 255\n" % (width, height) + b"0 " * 32


def pbm(width: int, height: int) -> bytes:
    return b"P4\n%d %d\n" % (width, height) + bytes(64)


def pam(width: int, height: int) -> bytes:
    return (b"P7\nWIDTH %d\nHEIGHT %d\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
            % (width, height) + bytes(64))


def pfm(width: int, height: int) -> bytes:
    return b"PF\n%d %d\n-1.0\n" % (width, height) + bytes(64)


def sunras(width: int, height: int) -> bytes:
    return struct.pack(">IiiiiiII", 0x59A66A95, width, height, 24, 0, 1, 0, 0) + bytes(64)


def hdr(width: int, height: int) -> bytes:
    return (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (height, width)
            + bytes(64))


def _patch_siz(data: bytearray, at: int, width: int, height: int) -> None:
    assert data[at:at + 4] == b"\xff\x4f\xff\x51"
    struct.pack_into(">IIII", data, at + 8, width, height, 0, 0)


def jp2(width: int, height: int) -> bytes:
    data = bytearray(_small(".jp2"))
    ihdr = data.find(b"ihdr")
    struct.pack_into(">II", data, ihdr + 4, height, width)
    _patch_siz(data, data.find(b"\xff\x4f\xff\x51"), width, height)
    return bytes(data)


def j2k(width: int, height: int) -> bytes:
    data = _small(".jp2")
    codestream = bytearray(data[data.find(b"\xff\x4f\xff\x51"):])
    _patch_siz(codestream, 0, width, height)
    return bytes(codestream)


def avif(width: int, height: int) -> bytes:
    data = bytearray(_small(".avif"))
    at = data.find(b"ispe")
    assert at > 0
    while at > 0:
        struct.pack_into(">II", data, at + 8, width, height)
        at = data.find(b"ispe", at + 4)
    return bytes(data)


# name -> (builder, the format data.image_headers reports)
BOMBS: dict[str, tuple[Callable[[int, int], bytes], str]] = {
    "png": (png, "png"),
    "jpeg": (jpeg, "jpeg"),
    "bmp-rle8": (bmp_rle8, "bmp"),
    "bmp-rle4": (bmp_rle4, "bmp"),
    "bmp-top-down": (bmp_rgb, "bmp"),
    "bmp-os2": (bmp_os2, "bmp"),
    "gif": (gif, "gif"),
    "webp-vp8x": (webp_vp8x, "webp"),
    "webp-vp8l": (webp_vp8l, "webp"),
    "webp-vp8": (webp_vp8, "webp"),
    "tiff": (tiff, "tiff"),
    "tiff-big-endian": (tiff_be, "tiff"),
    "bigtiff": (bigtiff, "tiff"),
    "ppm": (ppm, "pnm"),
    "pgm-ascii": (pgm_ascii, "pnm"),
    "pbm": (pbm, "pnm"),
    "pam": (pam, "pam"),
    "pfm": (pfm, "pfm"),
    "sunras": (sunras, "sunras"),
    "hdr": (hdr, "hdr"),
    "jp2": (jp2, "jp2"),
    "j2k": (j2k, "j2k"),
    "avif": (avif, "avif"),
}
