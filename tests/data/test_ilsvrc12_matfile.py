"""data/matfile.py: the MAT v5 subset that the ILSVRC2012 devkit's meta.mat needs."""
from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from data.errors import ImagenetError
from data.matfile import loadmat, savemat

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


def test_reads_a_struct_array_written_by_scipy():
    synsets = loadmat("scipy.mat", SCIPY_META)["synsets"]
    assert [s["WNID"] for s in synsets] == ["n01443537", "n01440764", "n00001740"]
    assert [int(s["ILSVRC2012_ID"][0, 0]) for s in synsets] == [2, 1, 3]
    assert synsets[0]["words"] == "goldfish, Carassius auratus"
    assert synsets[2]["children"].tolist() == [[1.0, 2.0]]
    assert synsets[0]["children"].shape == (1, 0)


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_of_our_writer(tmp_path, compress):
    rows = [dict(ILSVRC2012_ID=7.0, WNID="n01440764", words="tench, Tinca tinca",
                 num_children=0.0, children=[]),
            dict(ILSVRC2012_ID=1001.0, WNID="n00001740", words="entity", num_children=2.0,
                 children=[7.0, 3.0])]
    savemat(tmp_path / "m.mat", {"synsets": rows, "note": "ok"}, compress=compress)
    back = loadmat(tmp_path / "m.mat")
    assert back["note"] == "ok"
    assert [s["WNID"] for s in back["synsets"]] == ["n01440764", "n00001740"]
    assert back["synsets"][1]["children"].tolist() == [[7.0, 3.0]]
    assert back["synsets"][0]["children"].size == 0


def test_narrow_storage_types_and_small_elements_are_widened():
    # A 1x3 double stored as miUINT8 in a small data element, as MATLAB writes small integers.
    def tag(t, payload):
        return struct.pack("<II", t, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    name = struct.pack("<HH", 1, 1) + b"x\0\0\0"  # small element: miINT8, 1 byte
    body = (tag(6, struct.pack("<II", 6, 0)) + tag(5, struct.pack("<ii", 1, 3)) + name
            + struct.pack("<HH", 2, 3) + bytes([1, 2, 250, 0]))
    header = b"MATLAB 5.0 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x100) + b"IM"
    out = loadmat("narrow.mat", header + tag(14, body))
    assert out["x"].dtype == np.float64 and out["x"].tolist() == [[1.0, 2.0, 250.0]]


def test_refuses_v73_and_garbage():
    with pytest.raises(ImagenetError, match="v7.3"):
        loadmat("h5.mat", b"MATLAB 7.3 MAT-file".ljust(512, b" "))
    with pytest.raises(ImagenetError, match="MAT v5 header"):
        loadmat("junk.mat", b"x" * 200)
    with pytest.raises(ImagenetError, match="runs past the end"):
        loadmat("cut.mat", SCIPY_META[:200])
