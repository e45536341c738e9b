"""Image sizes from file headers, for every format OpenCV decodes, without decoding a pixel.

data/images.py refuses a decompression bomb (a small file whose header asks for billions of
pixels: an RLE BMP of 20000x20000 is 1.2 KB and decodes to 1.2 GB) from the size read here. A
limit is only as good as its weakest format, so this module reads the size the way OpenCV's own
decoder would for each format the OpenCV build decodes (modules/imgcodecs/src/grfmt_*.cpp):

  BMP (incl. RLE4/RLE8, OS/2), GIF, AVIF, Radiance HDR, JPEG, WebP (RIFF, and the bare VP8/VP8L
  streams libwebp also accepts), Sun raster, PBM/PGM/PPM, PAM, PFM, TIFF (and BigTIFF), PNG,
  JPEG 2000 (JP2 and bare J2K codestreams)

The format is told from the content, by each decoder's `checkSignature`, in the order OpenCV
tries them (loadsave.cpp, ImageCodecInitializer), so that the size read here is the size OpenCV
would allocate. `read_header` returns None only when no decoder claims the bytes (OpenCV then
fails too); a header a decoder claims but whose size cannot be read gives width = height = 0,
which data/images.py refuses like OpenCV's validateInputImageSize.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def readable(self) -> bool:
        return self.width > 0 and self.height > 0


# ----------------------------------------------------------------------------- JPEG

# Start-of-frame markers, which carry the size: C0-CF except DHT C4, JPG C8, DAC CC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8), 0xD8, 0xD9])
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the first SOF segment, walking marker segments from SOI the way
    libjpeg's next_marker does: bytes that are not 0xFF before a marker are skipped (libjpeg
    warns "extraneous bytes before marker" and goes on), as are fill bytes and FF 00."""
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            pos += 1
            continue
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            if marker == _JPEG_EOI:
                return None
            continue
        if pos + 2 > n:
            return None
        (length,) = struct.unpack_from(">H", data, pos)
        if marker in _JPEG_SOF:
            if pos + 7 > n:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
        if marker == _JPEG_SOS:
            return None  # a scan before any frame header: libjpeg gives up
        pos += length
    return None


# ----------------------------------------------------------------------------- PNG, GIF, BMP

def _png(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    return None


def _gif(data: bytes) -> tuple[int, int] | None:
    # grfmt_gif.cpp: the logical screen size is the canvas; every frame must fit in it.
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack_from("<HH", data, 6)
    return None


def _bmp(data: bytes) -> tuple[int, int] | None:
    # grfmt_bmp.cpp: the info header's size picks the layout; a negative height is top-down.
    if len(data) < 18:
        return None
    (size,) = struct.unpack_from("<i", data, 14)
    if size >= 36 and len(data) >= 26:
        width, height = struct.unpack_from("<ii", data, 18)
    elif size == 12 and len(data) >= 22:
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        return None
    return width, abs(height)


# ----------------------------------------------------------------------------- WebP

def _vp8(frame: bytes) -> tuple[int, int] | None:
    """A lossy VP8 key frame: 3-byte frame tag, start code 9d 01 2a, 14-bit sizes."""
    if len(frame) >= 10 and frame[3:6] == b"\x9d\x01\x2a" and not frame[0] & 1:
        width, height = struct.unpack_from("<HH", frame, 6)
        return width & 0x3FFF, height & 0x3FFF
    return None


def _vp8l(stream: bytes) -> tuple[int, int] | None:
    """A lossless VP8L stream: signature 0x2f, then (width - 1) and (height - 1) in 14 bits."""
    if len(stream) >= 5 and stream[0] == 0x2F and stream[4] >> 5 == 0:
        (bits,) = struct.unpack_from("<I", stream, 1)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _webp_sniff(data: bytes) -> bool:
    """libwebp's WebPGetFeatures on the first 32 bytes (OpenCV's checkSignature): a RIFF/WEBP
    file, or a bare VP8/VP8L bitstream."""
    if len(data) < 32:
        return False
    if data[:4] == b"RIFF":
        return data[8:12] == b"WEBP"
    return _vp8l(data) is not None or _vp8(data) is not None


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF":
        return _vp8l(data) or _vp8(data)
    chunk, payload = data[12:16], data[20:]
    if chunk == b"VP8X" and len(payload) >= 10:
        # The canvas (animations and alpha included): 24-bit (width - 1), (height - 1).
        width = int.from_bytes(payload[4:7], "little") + 1
        height = int.from_bytes(payload[7:10], "little") + 1
        return width, height
    if chunk == b"VP8L":
        return _vp8l(payload)
    if chunk == b"VP8 ":
        return _vp8(payload)
    return None


# ----------------------------------------------------------------------------- TIFF

# SHORT, LONG, LONG8 (BigTIFF), SSHORT, SLONG: struct formats of the value
_TIFF_TYPES = {3: "H", 4: "I", 16: "Q", 8: "h", 9: "i"}


def _tiff(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first directory, the page imread reads."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (version,) = struct.unpack_from(order + "H", data, 2)
        if version == 42:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, ifd)
            first, entry_size, count_fmt = ifd + 2, 12, "I"
        elif version == 43:  # BigTIFF
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, ifd)
            first, entry_size, count_fmt = ifd + 8, 20, "Q"
        else:
            return None
        found: dict[int, int] = {}
        for i in range(min(count, (len(data) - first) // entry_size)):
            at = first + i * entry_size
            tag, kind = struct.unpack_from(order + "HH", data, at)
            if tag in (256, 257) and kind in _TIFF_TYPES:
                (found[tag],) = struct.unpack_from(order + _TIFF_TYPES[kind], data,
                                                   at + 4 + struct.calcsize(count_fmt))
            if len(found) == 2:
                return found[256], found[257]
    except struct.error:
        return None
    return None


# ----------------------------------------------------------------------------- Netpbm family

def _pnm_number(data: bytes, pos: int) -> tuple[int, int] | None:
    """grfmt_pxm.cpp ReadNumber: skip whitespace and '#' comments (to CR or LF), read digits."""
    n = len(data)
    while pos < n and not chr(data[pos]).isdigit():
        if data[pos] == ord("#"):
            while pos < n and data[pos] not in b"\r\n":
                pos += 1
            pos += 1
        elif chr(data[pos]).isspace():
            pos += 1
        else:
            return None  # OpenCV throws on any other byte
    start = pos
    while pos < n and chr(data[pos]).isdigit():
        pos += 1
    if pos == start:
        return None
    return int(data[start:pos]), pos


def _pxm(data: bytes) -> tuple[int, int] | None:
    width = _pnm_number(data, 2)
    height = _pnm_number(data, width[1]) if width else None
    return (width[0], height[0]) if width and height else None


def _pam(data: bytes) -> tuple[int, int] | None:
    """grfmt_pam.cpp: `WIDTH n` and `HEIGHT n` header lines up to ENDHDR."""
    end = data.find(b"ENDHDR")
    size: dict[bytes, int] = {}
    for line in data[3:end if end >= 0 else None].split(b"\n"):
        fields = line.split()
        if len(fields) >= 2 and fields[0] in (b"WIDTH", b"HEIGHT") and fields[1].isdigit():
            size[fields[0]] = int(fields[1])
    if b"WIDTH" in size and b"HEIGHT" in size:
        return size[b"WIDTH"], size[b"HEIGHT"]
    return None


def _atoi(token: bytes) -> int:
    m = re.match(rb"[+-]?\d+", token)
    return int(m.group()) if m else 0


def _pfm(data: bytes) -> tuple[int, int] | None:
    """grfmt_pfm.cpp: 'P', 'f' or 'F', a line feed, then numbers each ended by ONE whitespace
    byte and read with atoi (so two spaces in a row give a zero)."""
    if data[2:3] != b"\n":
        return None
    tokens = re.split(rb"[ \t\n\v\f\r]", data[3:3 + 4096], maxsplit=2)
    if len(tokens) < 3:
        return None
    return _atoi(tokens[0]), _atoi(tokens[1])


# ----------------------------------------------------------------------------- others

def _sunras(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 12:
        return struct.unpack_from(">ii", data, 4)
    return None


_HDR_SIZE = re.compile(rb"[ \t\v\f\r]*-Y\s*([+-]?\d+)\s*\+X\s*([+-]?\d+)")


def _hdr(data: bytes) -> tuple[int, int] | None:
    """rgbe.cpp RGBE_ReadHeader: header lines, a blank line, then `-Y <height> +X <width>`."""
    blank = data.find(b"\n\n")
    if blank < 0:
        return None
    m = _HDR_SIZE.match(data, blank + 2)
    return (int(m.group(2)), int(m.group(1))) if m else None


def _j2k_siz(data: bytes, at: int) -> tuple[int, int] | None:
    """A JPEG 2000 codestream's SIZ segment (SOC FF4F, SIZ FF51): Xsiz - XOsiz by
    Ysiz - YOsiz, the image area OpenJPEG allocates."""
    if data[at:at + 4] != b"\xff\x4f\xff\x51" or len(data) < at + 24:
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, at + 8)
    return xsiz - xo, ysiz - yo


def _boxes(data: bytes, start: int, end: int):
    """ISO base media boxes (JP2, AVIF) in data[start:end]: (type, payload start, box end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1 and pos + 16 <= end:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            head = 16
        elif size == 0:
            size = end - pos
        if size < head:
            return
        yield kind, pos + head, min(pos + size, end)
        pos += size


def _jp2(data: bytes) -> tuple[int, int] | None:
    """The JP2 header box's ihdr and the codestream's SIZ: the larger, since OpenJPEG
    allocates what the codestream says whatever ihdr claims."""
    sizes = []
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for sub, s, e in _boxes(data, start, end):
                if sub == b"ihdr" and e - s >= 8:
                    height, width = struct.unpack_from(">II", data, s)
                    sizes.append((width, height))
        elif kind == b"jp2c":
            siz = _j2k_siz(data, start)
            if siz is None:
                return None
            sizes.append(siz)
    if not sizes:
        return None
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def _j2k(data: bytes) -> tuple[int, int] | None:
    return _j2k_siz(data, 0)


_ISO_CONTAINERS = {b"meta": 4, b"iprp": 0, b"ipco": 0, b"moov": 0, b"trak": 0}


def _avif(data: bytes) -> tuple[int, int] | None:
    """Every image spatial extent (ispe) and track header (tkhd, image sequences): the
    largest, which bounds what libavif allocates for the primary image, a grid or a frame."""
    sizes: list[tuple[int, int]] = []

    def walk(start: int, end: int, depth: int) -> None:
        for kind, s, e in _boxes(data, start, end):
            if kind in _ISO_CONTAINERS and depth < 8:
                walk(s + _ISO_CONTAINERS[kind], e, depth + 1)
            elif kind == b"ispe" and e - s >= 12:
                sizes.append(struct.unpack_from(">II", data, s + 4))
            elif kind == b"tkhd" and e - s >= 84:
                at = s + (88 if data[s] == 1 else 76)
                if at + 8 <= e:
                    width, height = struct.unpack_from(">II", data, at)
                    sizes.append((width >> 16, height >> 16))

    walk(0, len(data), 0)
    return max(sizes, key=lambda wh: wh[0] * wh[1]) if sizes else None


def _avif_sniff(data: bytes) -> bool:
    """An ISO file type box whose major or compatible brands include avif or avis."""
    if data[4:8] != b"ftyp" or len(data) < 16:
        return False
    (size,) = struct.unpack_from(">I", data, 0)
    brands = data[8:8 + 4] + data[16:min(size, len(data))]
    return any(brands[i:i + 4] in (b"avif", b"avis") for i in range(0, len(brands), 4))


def _isspace(byte: bytes) -> bool:
    return len(byte) == 1 and byte in b" \t\n\v\f\r"


# (format, checkSignature, size reader) in OpenCV's registration order: the first decoder
# whose signature matches is the one imread/imdecode uses.
_DECODERS: tuple[tuple[str, Callable[[bytes], bool], Callable[[bytes], tuple[int, int] | None]],
                 ...] = (
    ("bmp", lambda d: d[:2] == b"BM", _bmp),
    ("gif", lambda d: d[:3] == b"GIF", _gif),
    ("avif", _avif_sniff, _avif),
    ("hdr", lambda d: d[:6] == b"#?RGBE" or d[:10] == b"#?RADIANCE", _hdr),
    ("jpeg", lambda d: d[:3] == b"\xff\xd8\xff", _jpeg),
    ("webp", _webp_sniff, _webp),
    ("sunras", lambda d: d[:4] == b"\x59\xa6\x6a\x95", _sunras),
    ("pnm", lambda d: d[:1] == b"P" and d[1:2] in b"123456" and _isspace(d[2:3]), _pxm),
    ("pam", lambda d: d[:2] == b"P7" and _isspace(d[2:3]), _pam),
    ("pfm", lambda d: d[:1] == b"P" and d[1:2] in (b"f", b"F") and _isspace(d[2:3]), _pfm),
    ("tiff", lambda d: d[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"), _tiff),
    ("png", lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", _png),
    ("jp2", lambda d: d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n", _jp2),
    ("j2k", lambda d: d[:4] == b"\xff\x4f\xff\x51", _j2k),
)
FORMATS = tuple(name for name, _, _ in _DECODERS)


def read_header(data: bytes) -> ImageHeader | None:
    """The format and size OpenCV's decoder for `data` would read from its header; None when
    no decoder claims the bytes; width = height = 0 when one claims them but the size cannot
    be read (OpenCV then fails on it too)."""
    for name, claims, size in _DECODERS:
        if claims(data):
            try:
                wh = size(data)
            except (struct.error, ValueError, IndexError):
                wh = None
            return ImageHeader(name, *wh) if wh else ImageHeader(name, 0, 0)
    return None
