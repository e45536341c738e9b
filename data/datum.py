"""Caffe's record formats <-> numpy: `Datum` (one image + label) and `BlobProto` (mean files).

Layouts are Caffe's (src/caffe/util/io.cpp CVMatToDatum / DecodeDatumNative,
src/caffe/blob.cpp FromProto / ToProto): a raw Datum holds uint8 pixels in C x H x W order,
channels B, G, R; an encoded Datum holds image file bytes with `encoded: true`; a mean file is a
BlobProto with the legacy num/channels/height/width fields and float data.

`decode_datum_bytes` and `encode_datum_bytes` are the hot paths (training input, conversion):
they read and write the protobuf wire format directly, so a 196 KB record is neither parsed
into a message nor copied; the tests check they agree byte for byte with caffe_pb2.

OpenCV and the generated caffe_pb2 (protobuf) are imported where a function needs them, not
with the module: `imagenet compute-image-mean` on raw records and its mean file need neither
(about 60-100 ms of a process that sums 1000 records in ~30 ms; benchmarks/README.md).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError

if TYPE_CHECKING:
    from data.proto import caffe_pb2

M = TypeVar("M")  # a protobuf message class

# Datum field numbers (caffe.proto) and wire types, for the hand-rolled fast paths.
_WT_VARINT, _WT_FIXED64, _WT_LEN, _WT_FIXED32 = 0, 1, 2, 5
_F_CHANNELS, _F_HEIGHT, _F_WIDTH, _F_DATA, _F_LABEL, _F_FLOAT_DATA, _F_ENCODED = 1, 2, 3, 4, 5, 6, 7
_BLOB_DATA_TAG = b"\x2a"  # BlobProto.data = 5, packed (length-delimited)
_F_BLOB_DATA, _F_BLOB_DOUBLE_DATA = 5, 8
_BLOB_LEGACY_FIELDS = (1, 2, 3, 4)  # num, channels, height, width
_INT32_MASK = (1 << 64) - 1  # negative int32 varints are 64-bit two's complement on the wire
_LEGACY_DIMS = 4


# ------------------------------------------------------------------ wire-format helpers

def _varint_bytes(value: int) -> bytes:
    value &= _INT32_MASK
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ImagenetError("corrupt Datum: varint longer than 10 bytes")


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class DatumHeader(NamedTuple):
    """Everything in a serialized Datum except the pixels, plus where the pixels are."""

    channels: int
    height: int
    width: int
    label: int
    encoded: bool
    data_offset: int
    data_length: int
    has_float_data: bool


def parse_datum_header(value: bytes | memoryview) -> DatumHeader:
    """Walk a serialized Datum's fields without copying `data` (a handful of varints)."""
    buf = value if isinstance(value, (bytes, bytearray)) else memoryview(value).cast("B")
    channels = height = width = label = 0
    encoded = has_float = False
    data_offset = data_length = 0
    pos, end = 0, len(buf)
    try:
        while pos < end:
            tag = buf[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = _read_varint(buf, pos)
            field, wire = tag >> 3, tag & 7
            if wire == _WT_VARINT:
                val, pos = _read_varint(buf, pos)
                if field == _F_CHANNELS:
                    channels = _as_int32(val)
                elif field == _F_HEIGHT:
                    height = _as_int32(val)
                elif field == _F_WIDTH:
                    width = _as_int32(val)
                elif field == _F_LABEL:
                    label = _as_int32(val)
                elif field == _F_ENCODED:
                    encoded = bool(val)
            elif wire == _WT_LEN:
                length, pos = _read_varint(buf, pos)
                if field == _F_DATA:
                    data_offset, data_length = pos, length
                elif field == _F_FLOAT_DATA:
                    has_float = has_float or length > 0
                pos += length
            elif wire == _WT_FIXED32:
                has_float = has_float or field == _F_FLOAT_DATA
                pos += 4
            elif wire == _WT_FIXED64:
                pos += 8
            else:
                raise ImagenetError(f"corrupt Datum: unsupported wire type {wire} at byte {pos}")
    except IndexError:
        raise ImagenetError(f"corrupt Datum: record ends inside a field ({end} bytes)") from None
    if pos != end:
        raise ImagenetError(f"corrupt Datum: last field runs past the end ({end} bytes)")
    return DatumHeader(channels, height, width, label, encoded, data_offset, data_length, has_float)


# ------------------------------------------------------------------ Datum

def decode_encoded(data: bytes | memoryview, *, force_color: bool = False) -> np.ndarray:
    """Decode an encoded Datum's bytes like Caffe: DecodeDatumNative = cv::imdecode(data, -1)
    (channels as stored, EXIF ignored); DecodeDatum(datum, true) = IMREAD_COLOR. -> (C,H,W)."""
    import cv2  # see the module docstring: imported where needed

    from data.images import ImageSkip, MAX_PIXELS_DEFAULT, check_size, read_header

    try:  # a decompression bomb stored in a record is refused from its header, like a file
        check_size(read_header(bytes(data)), MAX_PIXELS_DEFAULT, "")
    except ImageSkip as skip:
        raise ImagenetError(f"encoded image refused: {skip.reason}") from None
    flag = cv2.IMREAD_COLOR if force_color else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if img is None:
        raise ImagenetError(f"could not decode an encoded Datum ({len(data)} bytes)")
    if img.dtype != np.uint8:
        # Caffe's CVMatToDatum CHECKs CV_8U; a 16-bit PNG cannot become a Datum.
        raise ImagenetError(f"encoded Datum decodes to {img.dtype}, not uint8 (16-bit image?)")
    return img[np.newaxis] if img.ndim == 2 else img.transpose(2, 0, 1)


def datum_to_array(datum: caffe_pb2.Datum, *, force_color: bool = False) -> np.ndarray:
    """A Datum's pixels: uint8 (C,H,W) BGR; encoded ones decoded natively like Caffe (or in
    colour with force_color, Caffe's force_encoded_color); float_data -> float32 (C,H,W)."""
    if datum.encoded:
        return decode_encoded(datum.data, force_color=force_color)
    shape = (datum.channels, datum.height, datum.width)
    count = shape[0] * shape[1] * shape[2]
    if count <= 0 or min(shape) < 0:
        raise ImagenetError(
            f"Datum has channels x height x width = {shape[0]}x{shape[1]}x{shape[2]}: no image "
            f"(an empty or damaged record; {_payload(datum)})")
    if not datum.data and not datum.float_data:
        raise ImagenetError(f"Datum holds no pixels (neither data nor float_data) for "
                            f"channels x height x width = {shape[0]}x{shape[1]}x{shape[2]}")
    if datum.data:
        if len(datum.data) != count:
            raise ImagenetError(
                f"Datum data has {len(datum.data)} bytes, but channels x height x width = "
                f"{shape[0]}x{shape[1]}x{shape[2]} = {count}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != count:
        raise ImagenetError(
            f"Datum float_data has {len(datum.float_data)} values, but channels x height x "
            f"width = {shape[0]}x{shape[1]}x{shape[2]} = {count}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def _payload(datum: caffe_pb2.Datum) -> str:
    if datum.data:
        return f"{len(datum.data)} bytes of data"
    if datum.float_data:
        return f"{len(datum.float_data)} float_data values"
    return "no data"


def decode_datum_bytes(value: bytes | memoryview, *, force_color: bool = False
                       ) -> tuple[np.ndarray, int]:
    """Serialized Datum -> ((C,H,W) array, label). Raw records come back as a read-only view
    of `value` (no copy: keep `value` alive, and copy before the LMDB transaction ends if it is
    a buffer from the map)."""
    head = parse_datum_header(value)
    if head.encoded:
        data = memoryview(value)[head.data_offset:head.data_offset + head.data_length]
        return decode_encoded(data, force_color=force_color), head.label
    if head.has_float_data or head.data_length == 0:
        from data.proto import caffe_pb2

        datum = caffe_pb2.Datum()
        datum.ParseFromString(bytes(value))
        return datum_to_array(datum), head.label
    count = head.channels * head.height * head.width
    if head.data_length != count or count <= 0:
        raise ImagenetError(
            f"Datum data has {head.data_length} bytes, but channels x height x width = "
            f"{head.channels}x{head.height}x{head.width} = {count}"
            + (": the record is cut short or corrupt" if 0 < head.data_length < count else ""))
    arr = np.frombuffer(value, dtype=np.uint8, count=count, offset=head.data_offset)
    return arr.reshape(head.channels, head.height, head.width), head.label


def _check_chw(chw: np.ndarray) -> None:
    if chw.ndim != 3:
        raise ImagenetError(f"a Datum holds a (C,H,W) array, got shape {chw.shape}")


def array_to_datum(chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """(C,H,W) uint8 -> raw Datum (data) or float -> Datum with float_data, fields set in the
    order Caffe's CVMatToDatum + set_label set them (so the serialization matches Caffe's)."""
    _check_chw(chw)
    from data.proto import caffe_pb2

    c, h, w = chw.shape
    datum = caffe_pb2.Datum(channels=c, height=h, width=w)
    if chw.dtype == np.uint8:
        datum.data = np.ascontiguousarray(chw).tobytes()
    else:
        datum.float_data.extend(np.asarray(chw, dtype=np.float32).ravel().tolist())
    datum.label = int(label)
    datum.encoded = False
    return datum


def raw_datum_prefix(shape: tuple[int, int, int]) -> bytes:
    """Wire bytes that precede the pixels of a raw Datum of this shape."""
    c, h, w = shape
    return (b"\x08" + _varint_bytes(c) + b"\x10" + _varint_bytes(h) + b"\x18" + _varint_bytes(w)
            + b"\x22" + _varint_bytes(c * h * w))


def raw_datum_suffix(label: int) -> bytes:
    """Wire bytes after the pixels: label, then encoded=false (Caffe sets both explicitly)."""
    return b"\x28" + _varint_bytes(int(label)) + b"\x38\x00"


def encode_datum_bytes(chw: np.ndarray, label: int) -> bytes:
    """array_to_datum(chw, label).SerializeToString() for uint8 arrays, with two copies of the
    pixels instead of four."""
    _check_chw(chw)
    if chw.dtype != np.uint8:
        return array_to_datum(chw, label).SerializeToString()
    # bytes.join takes the planes through the buffer protocol: one de-interleaving copy into
    # temporaries, one into the result. An HxWxC image seen as CxHxW (images.to_chw) is split
    # by OpenCV's SIMD de-interleave: 56 vs 91 us for 256x256x3, numpy's strided copy being
    # the slower.
    hwc = chw.transpose(1, 2, 0)
    if 1 < chw.shape[0] <= 4 and hwc.flags.c_contiguous:
        import cv2  # see the module docstring; an import statement costs ~0.1 us here

        planes = cv2.split(hwc)
    else:
        planes = (np.ascontiguousarray(chw),)
    return b"".join((raw_datum_prefix(chw.shape), *planes, raw_datum_suffix(label)))


def encoded_datum_bytes(data: bytes, label: int) -> bytes:
    """An encoded Datum as Caffe's ReadFileToDatum / ReadImageToDatum write it: data, label,
    encoded=true (channels/height/width unset)."""
    return (b"\x22" + _varint_bytes(len(data)) + data + b"\x28" + _varint_bytes(int(label))
            + b"\x38\x01")


# ------------------------------------------------------------------ BlobProto

def blobproto_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """float32 array shaped like Caffe's Blob::FromProto: the legacy (num, channels, height,
    width) when any legacy field is set, else `shape.dim`. double_data wins when present.

    The values are read straight from the packed field's wire bytes: going through the
    repeated-field container boxes every float (AlexNet's fc6 has 37.7M of them)."""
    legacy = any(blob.HasField(name) for name in ("num", "channels", "height", "width"))
    if legacy:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    if len(blob.double_data):
        values = _packed_payload(blob, _F_BLOB_DOUBLE_DATA, np.dtype("<f8"))
        values = (np.asarray(blob.double_data) if values is None else values).astype(np.float32)
    else:
        values = _packed_payload(blob, _F_BLOB_DATA, np.dtype("<f4"))
        if values is None:
            values = np.asarray(blob.data, dtype=np.float32)
    count = int(np.prod(shape, dtype=np.int64))
    if values.size != count:
        raise ImagenetError(
            f"BlobProto holds {values.size} values but its shape {list(shape)} needs {count}")
    return values.reshape(shape)


def _packed_payload(blob: caffe_pb2.BlobProto, field: int, dtype: np.dtype) -> np.ndarray | None:
    """The packed payload of one repeated float/double field as a (copied) array, read from
    the blob's wire bytes; None if the field is stored unpacked (the caller then iterates)."""
    buf = blob.SerializeToString()
    chunks: list[bytes] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _WT_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire in (_WT_FIXED64, _WT_FIXED32):
            if number == field:
                return None
            pos += 8 if wire == _WT_FIXED64 else 4
        elif wire == _WT_LEN:
            length, pos = _read_varint(buf, pos)
            if number == field:
                chunks.append(buf[pos:pos + length])
            pos += length
        else:
            return None
    return np.frombuffer(b"".join(chunks), dtype=dtype).copy()


def blobproto_bytes(arr: np.ndarray, legacy_4d: bool = True) -> bytes:
    """A float32 BlobProto's wire bytes, fields in number order as protobuf serializes them
    (so equal to array_to_blobproto(...).SerializeToString()); legacy_4d writes
    num/channels/height/width (shape padded with leading 1s, as Caffe's compute_image_mean
    writes num=1), else `shape.dim`."""
    arr = np.asarray(arr, dtype=np.float32)
    head = tail = b""
    if legacy_4d:
        if arr.ndim > _LEGACY_DIMS:
            raise ImagenetError(f"legacy BlobProto holds at most 4 axes, got shape {arr.shape}")
        dims = (1,) * (_LEGACY_DIMS - arr.ndim) + arr.shape
        head = b"".join(bytes([(f << 3) | _WT_VARINT]) + _varint_bytes(d)
                        for f, d in zip(_BLOB_LEGACY_FIELDS, dims))
    else:
        dims_wire = b"".join(_varint_bytes(d) for d in arr.shape)
        shape_msg = b"\x0a" + _varint_bytes(len(dims_wire)) + dims_wire
        tail = b"\x3a" + _varint_bytes(len(shape_msg)) + shape_msg
    payload = arr.astype("<f4").tobytes()
    return head + _BLOB_DATA_TAG + _varint_bytes(len(payload)) + payload + tail


def array_to_blobproto(arr: np.ndarray, legacy_4d: bool = True) -> caffe_pb2.BlobProto:
    """float32 BlobProto (see blobproto_bytes)."""
    from data.proto import caffe_pb2

    # Built as wire bytes and parsed: a packed float field parses with one memcpy, where
    # extending `blob.data` from Python would box every value.
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(blobproto_bytes(arr, legacy_4d))
    return blob


def read_blobproto(path: str | os.PathLike) -> np.ndarray:
    """Read a .binaryproto (mean file) written by Caffe or by us -> float32 array."""
    from data.proto import caffe_pb2

    path = Path(path)
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError has no stable import path across backends
        if isinstance(err, OSError):
            raise
        raise ImagenetError(f"{path}: not a serialized caffe.BlobProto ({err})") from None
    try:
        return blobproto_to_array(blob)
    except ImagenetError as err:
        raise ImagenetError(f"{path}: {err}") from None


def read_proto_file(path: str | os.PathLike, message: M, what: str, kind: str) -> M:
    """Parse the binary protobuf file `path` into `message` (returned). A missing file is
    "no such {what} file", one that does not parse is "not a binary {kind}": ImagenetErrors
    naming the file."""
    p = Path(path)
    try:
        payload = p.read_bytes()
    except FileNotFoundError:
        raise ImagenetError(f"{p}: no such {what} file") from None
    try:
        message.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError has no stable import path across backends
        raise ImagenetError(f"{p}: not a binary {kind} (corrupt or cut short): {exc}") from None
    return message


def write_blobproto(path: str | os.PathLike, arr: np.ndarray, legacy_4d: bool = True) -> None:
    """Write `arr` as a Caffe .binaryproto, atomically (temp file + rename)."""
    write_bytes_atomic(path, blobproto_bytes(arr, legacy_4d))


__all__ = [
    "DatumHeader", "array_to_blobproto", "array_to_datum", "blobproto_bytes", "blobproto_to_array",
    "datum_to_array", "decode_datum_bytes", "decode_encoded", "encode_datum_bytes",
    "encoded_datum_bytes", "parse_datum_header", "raw_datum_prefix", "raw_datum_suffix",
    "read_blobproto", "write_blobproto", "write_bytes_atomic",
]
