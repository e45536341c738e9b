"""data/devkit_meta.py: the ILSVRC2012 devkit's meta.mat through scipy.io (read in a child
process, written for the mini devkit), and a clear error for every bad .mat."""
from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import scipy.io

from data.devkit_meta import DevkitSynset, format_meta, read_meta
from data.errors import ImagenetError

# Written by scipy.io.savemat 1.17 (do_compression=True): an independent writer, with chars as
# miUTF8 and a 3x1 struct array like meta.mat's 'synsets' (IDs deliberately not in WNID order).
SCIPY_META = base64.b64decode(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IEZyaSBOb3YgMjcgMjE6NTc6"
    "NDMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "DQEAAHic42NgYGhgYWBgA9IcQMzEAAGsUD4zEDNCMTsQF1fmFaeWFAPlWRj4oOJuQOzpExwW5GxkYGgU7+nCEO4H"
    "JOCgPL8opRjOyyvNjU/OyMxJKUrNY2BAsCAAZKYFA8I9bGjuYUTCIMAJFYcCB5B+ByT9LFj0cyLpF4Dy8wwMTUyM"
    "TY3NkdwRQMAcaTRzQPz0/JyUtMziDB0F58SixOLizNJihcTSosSS0mJq+A+s34CAfgY0/ZTb+8GeonA1MDczQXKH"
    "BwFzhNDMAfFLUvOSgYEakpmXnKhQAiKp4a+BCk8OCtIpEBiamxjgcAc2c9jQzAHxU/NKMksqqZ/fsOlnQtMvANf+"
    "wR5mDgCqazg6")

ROWS = [dict(ILSVRC2012_ID=7.0, WNID="n01440764", words="tench, Tinca tinca", gloss="",
             num_children=0.0, children=[]),
        dict(ILSVRC2012_ID=1001.0, WNID="n00001740", words="entity", gloss="",
             num_children=2.0, children=[7.0, 3.0])]


def test_reads_a_struct_array_written_by_scipy():
    synsets = read_meta(SCIPY_META, "scipy.mat")
    assert [s.wnid for s in synsets] == ["n01443537", "n01440764", "n00001740"]
    assert [s.ilsvrc2012_id for s in synsets] == [2, 1, 3]
    assert synsets[0].words == "goldfish, Carassius auratus"
    assert [s.num_children for s in synsets] == [0, 0, 2]


def test_round_trip_of_the_mini_devkit_writer():
    data = format_meta(ROWS)
    assert read_meta(data, "m.mat") == [DevkitSynset(7, "n01440764", "tench, Tinca tinca", 0),
                                        DevkitSynset(1001, "n00001740", "entity", 2)]
    # What MATLAB and scipy see: an N x 1 struct array, children as 1 x n double rows.
    synsets = scipy.io.loadmat(io.BytesIO(data))["synsets"]
    assert synsets.shape == (2, 1)
    assert synsets[1, 0]["children"].tolist() == [[7.0, 3.0]]
    assert synsets[0, 0]["children"].size == 0
    # Same synsets, same bytes (scipy's header would carry the time of writing).
    assert format_meta(ROWS) == data and data.startswith(b"MATLAB 5.0 MAT-file, Platform: GLNXA64")
    with pytest.raises(ValueError, match="fields"):
        format_meta([ROWS[0], dict(WNID="n00001740")])


def _tag(typ: int, payload: bytes) -> bytes:
    return struct.pack("<II", typ, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _matrix(cls: int, dims: tuple[int, ...], name: bytes, *body: bytes) -> bytes:
    head = _tag(6, struct.pack("<II", cls, 0)) + _tag(5, struct.pack(f"<{len(dims)}i", *dims))
    return _tag(14, head + _tag(1, name) + b"".join(body))


def _mat5(*elements: bytes) -> bytes:
    return (b"MATLAB 5.0 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x100) + b"IM"
            + b"".join(elements))


def test_narrow_storage_types_and_small_elements_are_widened():
    # MATLAB stores a double ID of 250 as miUINT8 in a "small data element" (the data inside the
    # tag), and WNIDs as miUTF16: a 1x1 struct array built the way MATLAB writes it.
    small_id = struct.pack("<HH", 2, 1) + bytes([250, 0, 0, 0])
    fields = b"".join(f.ljust(32, b"\0") for f in (b"ILSVRC2012_ID", b"WNID"))
    synsets = _matrix(2, (1, 1), b"synsets", _tag(5, struct.pack("<i", 32)), _tag(1, fields),
                      _matrix(6, (1, 1), b"", small_id),
                      _matrix(4, (1, 9), b"", _tag(17, "n01440764".encode("utf-16-le"))))
    assert read_meta(_mat5(synsets), "narrow.mat") == [DevkitSynset(250, "n01440764", "", 0)]


def test_bad_mat_files_are_one_clear_error():
    v73 = b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x200) + b"IM"
    with pytest.raises(ImagenetError, match=r"^h5.mat: MAT v7.3 \(HDF5\)"):
        read_meta(v73 + b"\x89HDF\r\n\x1a\n" + bytes(400), "h5.mat")
    with pytest.raises(ImagenetError, match="^junk.mat: not a MAT-file"):
        read_meta(b"x" * 200, "junk.mat")
    with pytest.raises(ImagenetError, match="^empty.mat: not a MAT-file"):
        read_meta(b"", "empty.mat")
    with pytest.raises(ImagenetError, match="^cut.mat: truncated or corrupt MAT-file"):
        read_meta(SCIPY_META[:200], "cut.mat")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"other": np.eye(2)})
    with pytest.raises(ImagenetError, match="no 'synsets' struct array"):
        read_meta(buf.getvalue(), "other.mat")
    rows = [dict(ROWS[0], ILSVRC2012_ID=7.5)]
    with pytest.raises(ImagenetError, match=r"synsets\(1\).ILSVRC2012_ID is not one integer"):
        read_meta(format_meta(rows), "frac.mat")


def test_input_that_kills_scipys_reader_is_an_error_not_a_crash():
    # scipy.io.loadmat dies with SIGSEGV on an uncompressed struct array whose first number has
    # its data type zeroed (measured with scipy 1.17; scipy/scipy#6072 is the same class). The
    # child process takes the signal; here it is one error naming the file.
    table = np.empty((3, 1), dtype=[("ILSVRC2012_ID", object), ("WNID", object)])
    for i in range(3):
        table[i, 0]["ILSVRC2012_ID"], table[i, 0]["WNID"] = float(i + 1), f"n0144076{i}"
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": table}, do_compression=False)
    data = bytearray(buf.getvalue())
    data[data.index(struct.pack("<IId", 9, 8, 1.0))] = 0
    with pytest.raises(ImagenetError, match="^devkit.tar.gz:meta.mat: "):
        read_meta(bytes(data), "devkit.tar.gz:meta.mat")
