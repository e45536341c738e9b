"""A minimal MATLAB Level 5 MAT-file reader and writer, for the ILSVRC2012 devkit's meta.mat.

The devkit ships its synset table (ILSVRC2012_ID, WNID, words, num_children, ...) only as
`data/meta.mat`, a MAT v5 file holding one struct array `synsets`. SciPy is not a dependency, so
this module reads exactly what that file needs: the 128-byte header, miCOMPRESSED (zlib) and
miMATRIX elements of class struct, cell, char and the numeric classes, little- or big-endian,
including the "small data element" packing. Sparse, object, function-handle and complex arrays
and MAT v7.3 (HDF5) files are refused with a clear error. The writer emits the same subset (used
to build the mini devkit); files it writes load in scipy.io.loadmat and MATLAB.
Format reference: MathWorks, "MAT-File Format" (matfile_format.pdf), chapter 1.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import ImagenetError

HEADER_BYTES = 128
HEADER_TEXT_BYTES = 116

# Data types (matfile_format.pdf table 1-1) -> numpy dtype character.
MI_INT8, MI_UINT8, MI_INT16, MI_UINT16, MI_INT32, MI_UINT32 = 1, 2, 3, 4, 5, 6
MI_SINGLE, MI_DOUBLE, MI_INT64, MI_UINT64 = 7, 9, 12, 13
MI_MATRIX, MI_COMPRESSED, MI_UTF8, MI_UTF16, MI_UTF32 = 14, 15, 16, 17, 18
_MI_DTYPES = {
    MI_INT8: "i1", MI_UINT8: "u1", MI_INT16: "i2", MI_UINT16: "u2", MI_INT32: "i4",
    MI_UINT32: "u4", MI_SINGLE: "f4", MI_DOUBLE: "f8", MI_INT64: "i8", MI_UINT64: "u8",
}

# Array classes (table 1-3).
MX_CELL, MX_STRUCT, MX_OBJECT, MX_CHAR, MX_SPARSE, MX_DOUBLE = 1, 2, 3, 4, 5, 6
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4",
               14: "i8", 15: "u8"}
_FLAG_COMPLEX = 0x0800


class MatStruct(dict):
    """One element of a MATLAB struct array: field name -> value."""


def _fail(path: str, what: str) -> ImagenetError:
    return ImagenetError(f"{path}: {what} (only MAT v5 structs/cells/chars/numerics are read)")


class _Reader:
    def __init__(self, data: bytes, endian: str, path: str) -> None:
        self.data, self.e, self.path = data, endian, path

    def tag(self, pos: int) -> tuple[int, int, int, int]:
        """(type, nbytes, data offset, offset of the next element)."""
        if pos + 8 > len(self.data):
            raise _fail(self.path, f"truncated element at byte {pos}")
        first, second = struct.unpack_from(self.e + "II", self.data, pos)
        if first >> 16:  # small data element: nbytes in the upper half, data in the tag
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        end = pos + 8 + second
        if end > len(self.data):
            raise _fail(self.path, f"element at byte {pos} runs past the end of the file")
        pad = 0 if first == MI_COMPRESSED else (-second) % 8
        return first, second, pos + 8, end + pad

    def numbers(self, pos: int) -> tuple[np.ndarray, int]:
        typ, n, start, nxt = self.tag(pos)
        if typ not in _MI_DTYPES:
            raise _fail(self.path, f"numeric data of type {typ} at byte {pos}")
        dtype = np.dtype(self.e + _MI_DTYPES[typ])
        arr = np.frombuffer(self.data, dtype=dtype, count=n // dtype.itemsize, offset=start)
        return arr, nxt

    def chars(self, pos: int) -> tuple[str, int]:
        typ, n, start, nxt = self.tag(pos)
        raw = self.data[start:start + n]
        if typ in (MI_UTF8, MI_INT8, MI_UINT8):
            return raw.decode("utf-8"), nxt
        if typ in (MI_UTF16, MI_UINT16, MI_INT16):
            return raw.decode("utf-16-le" if self.e == "<" else "utf-16-be"), nxt
        if typ == MI_UTF32:
            return raw.decode("utf-32-le" if self.e == "<" else "utf-32-be"), nxt
        raise _fail(self.path, f"character data of type {typ} at byte {pos}")

    def element(self, pos: int) -> tuple[str, Any, int]:
        """(name, value, next position) of the element at `pos`."""
        typ, n, start, nxt = self.tag(pos)
        if typ == MI_COMPRESSED:
            try:
                inner = zlib.decompress(self.data[start:start + n])
            except zlib.error as err:
                raise _fail(self.path, f"corrupt compressed element at byte {pos}: {err}")
            name, value, _ = _Reader(inner, self.e, self.path).element(0)
            return name, value, nxt
        if typ != MI_MATRIX:
            raise _fail(self.path, f"unexpected top-level data type {typ} at byte {pos}")
        if n == 0:  # an empty matrix is allowed to have no sub-elements at all
            return "", np.zeros((0, 0)), nxt
        return (*self.matrix(start), nxt)

    def matrix(self, pos: int) -> tuple[str, Any]:
        flags, pos = self.numbers(pos)
        cls, is_complex = int(flags[0]) & 0xFF, bool(int(flags[0]) & _FLAG_COMPLEX)
        dims_arr, pos = self.numbers(pos)
        dims = tuple(int(d) for d in dims_arr)
        name_arr, pos = self.numbers(pos)
        name = bytes(name_arr.astype(np.uint8)).decode("ascii")
        count = int(np.prod(dims)) if dims else 0
        if is_complex:
            raise _fail(self.path, f"complex array {name!r}")
        if cls in _MX_NUMERIC:
            values, pos = self.numbers(pos)
            # Storage type may be narrower than the class (MATLAB stores 3.0 as a uint8).
            arr = values.astype(_MX_NUMERIC[cls]).reshape(dims, order="F")
            return name, arr
        if cls == MX_CHAR:
            text, pos = self.chars(pos)
            if len(dims) == 2 and dims[0] <= 1:
                return name, text
            rows = np.array(list(text), dtype="U1").reshape(dims, order="F") if count else None
            return name, ["".join(r) for r in rows] if rows is not None else []
        if cls == MX_CELL:
            cells = []
            for _ in range(count):
                _, value, pos = self.element(pos)
                cells.append(value)
            return name, cells
        if cls == MX_STRUCT:
            (field_len,), pos = self.numbers(pos)
            raw_names, pos = self.numbers(pos)
            raw = bytes(raw_names.astype(np.uint8))
            fields = [raw[i:i + int(field_len)].split(b"\0", 1)[0].decode("ascii")
                      for i in range(0, len(raw), int(field_len))] if field_len else []
            items = []
            for _ in range(count):
                item = MatStruct()
                for field in fields:
                    _, value, pos = self.element(pos)
                    item[field] = value
                items.append(item)
            return name, items
        raise _fail(self.path, f"array {name!r} of unsupported class {cls}")


def loadmat(path: Path | str, data: bytes | None = None) -> dict[str, Any]:
    """Variables of a MAT v5 file: name -> value. Struct arrays come back as lists of
    MatStruct (column-major element order), char rows as str, numerics as numpy arrays."""
    path = str(path)
    if data is None:
        data = Path(path).read_bytes()
    if len(data) < HEADER_BYTES:
        raise _fail(path, "too short to be a MAT-file")
    if data[:19] == b"MATLAB 7.3 MAT-file" or data[HEADER_BYTES:HEADER_BYTES + 4] == b"\x89HDF":
        raise _fail(path, "MAT v7.3 (HDF5) file; re-save it with `save -v7` or convert it to a "
                    "plain-text '<ILSVRC2012_ID> <WNID> <words>' mapping")
    indicator = data[126:128]
    if indicator == b"IM":
        endian = "<"
    elif indicator == b"MI":
        endian = ">"
    else:
        raise _fail(path, "no MAT v5 header (endian indicator missing)")
    reader = _Reader(data, endian, path)
    out: dict[str, Any] = {}
    pos = HEADER_BYTES
    while pos < len(data):
        name, value, pos = reader.element(pos)
        out[name] = value
    return out


# ---------------------------------------------------------------------------- writer


def _tag(typ: int, payload: bytes) -> bytes:
    return struct.pack("<II", typ, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)


def _matrix(name: str, value: Any) -> bytes:
    def head(cls: int, dims: tuple[int, ...]) -> bytes:
        return (_tag(MI_UINT32, struct.pack("<II", cls, 0))
                + _tag(MI_INT32, struct.pack(f"<{len(dims)}i", *dims))
                + _tag(MI_INT8, name.encode("ascii")))

    if isinstance(value, str):
        body = head(MX_CHAR, (1 if value else 0, len(value))) + _tag(
            MI_UINT16, value.encode("utf-16-le"))
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        fields = list(value[0])
        width = max(len(f) for f in fields) + 1
        names = b"".join(f.encode("ascii").ljust(width, b"\0") for f in fields)
        body = head(MX_STRUCT, (len(value), 1)) + _tag(MI_INT32, struct.pack("<i", width)) \
            + _tag(MI_INT8, names)
        for item in value:
            if list(item) != fields:
                raise ValueError("every struct element must have the same fields in order")
            body += b"".join(_matrix("", item[f]) for f in fields)
    else:
        arr = np.asarray(value, dtype="<f8")
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(1, 1) if arr.ndim == 0 else arr
        if arr.size == 0:
            arr = arr.reshape(0, 0)
        body = head(MX_DOUBLE, arr.shape) + _tag(MI_DOUBLE, arr.tobytes(order="F"))
    return _tag(MI_MATRIX, body)


def savemat(path: Path | str, variables: dict[str, Any], *, compress: bool = True) -> bytes:
    """Write `variables` (str, numbers / numeric arrays, or a list of dicts = an N x 1 struct
    array) as a MAT v5 file; each variable zlib-compressed like MATLAB's default `save -v7`.
    Returns the file bytes (written to `path` unless it is None)."""
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: imagenet-pipeline"
    out = text.ljust(HEADER_TEXT_BYTES, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    for name, value in variables.items():
        element = _matrix(name, value)
        if compress:
            packed = zlib.compress(element, 6)
            out += struct.pack("<II", MI_COMPRESSED, len(packed)) + packed
        else:
            out += element
    if path is not None:
        Path(path).write_bytes(out)
    return out
