"""data.lmdb_verify: an LMDB corrupted inside (not only cut short) is refused before it is
mapped, with the page and what is wrong; sound databases (Caffe's, ours) pass.

Each corruption below was measured before the check existed (a 300-record LMDB, read by
`imagenet compute-image-mean` and `imagenet train`): a leaf node's data size garbled killed
both with SIGBUS, a branch pointing back up the tree or at an overflow page aborted inside
LMDB (SIGABRT, mdb.c: Assertion 'IS_LEAF(mp)'), a garbled key size read a key from outside its
page, a wrong record count trained with exit 0; the rest were lmdb errors or went unnoticed.
"""
from __future__ import annotations

import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from data import lmdb_verify
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, LmdbWriter, check_data_file

PS = 4096


@dataclass(frozen=True)
class Layout:
    """Where things are in a small data.mdb: enough to aim a corruption."""
    meta: int  # byte offset of the current meta page
    root: int
    last: int
    branch: int  # a branch page (the root), or -1
    child: int  # byte offset of that branch page's node 1 (its second child), or -1
    leaf: int  # the leftmost leaf page
    node: int  # byte offset of that leaf's first node
    ksize: int  # its key size
    overflow: int  # the first page of its value's overflow run


def _u16(b: bytes, at: int) -> int:
    return struct.unpack_from("<H", b, at)[0]


def layout(data: Path) -> Layout:
    b = data.read_bytes()
    meta = PS if struct.unpack_from("<Q", b, PS + 144)[0] > struct.unpack_from("<Q", b, 144)[0] \
        else 0
    root, last = struct.unpack_from("<QQ", b, meta + 128)
    page, branch, child = root, -1, -1
    while _u16(b, page * PS + 10) & lmdb_verify.P_BRANCH:
        if branch < 0:
            branch, child = page, page * PS + _u16(b, page * PS + 16 + 2)
        node = page * PS + _u16(b, page * PS + 16)
        page = _u16(b, node) | _u16(b, node + 2) << 16
    node = page * PS + _u16(b, page * PS + 16)
    ksize = _u16(b, node + 6)
    overflow = struct.unpack_from("<Q", b, node + 8 + ksize)[0]
    return Layout(meta, root, last, branch, child, page, node, ksize, overflow)


def patch(data: Path, offset: int, raw: bytes) -> None:
    with open(data, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)


def _pgno16(page: int) -> bytes:  # a branch node's mn_lo, mn_hi
    return struct.pack("<HH", page & 0xFFFF, page >> 16)


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    """150 records of 5000 bytes (each in a 2-page overflow run): a branch root, 2 leaves."""
    db = tmp_path_factory.mktemp("verify") / "db"
    with LmdbWriter(db) as writer:
        for i in range(150):
            writer.put(f"{i:08d}_img{i}.jpg".encode(), bytes([i]) * 5000)
    return db


# (id, where and what to write, given the layout; what the error must say)
CORRUPTIONS = [
    ("meta-root-past-last-page", lambda L: (L.meta + 128, struct.pack("<Q", L.last + 50)),
     r"page [01]: the root page \d+ of the meta page .* outside the pages in use"),
    ("meta-root-to-overflow-page", lambda L: (L.meta + 128, struct.pack("<Q", L.overflow)),
     r"page \d+: a tree page with flags 0x4, neither a branch nor a leaf page"),
    ("meta-entries-wrong", lambda L: (L.meta + 120, struct.pack("<Q", 5)),
     r"the leaf pages hold 150 records but the meta page says 5"),
    ("meta-depth-wrong", lambda L: (L.meta + 94, struct.pack("<H", 40)),
     r"the tree has 2 levels but the meta page says 40"),
    ("branch-child-past-last-page", lambda L: (L.child, _pgno16(L.last + 9)),
     r"branch node 1 points to page \d+, outside the pages in use"),
    ("branch-child-to-itself", lambda L: (L.child, _pgno16(L.branch)),
     r"the tree reaches this page twice"),
    ("branch-child-to-overflow-page", lambda L: (L.child, _pgno16(L.overflow)),
     r"a tree page with flags 0x4"),
    ("branch-node-table-garbled", lambda L: (L.branch * PS + 12, struct.pack("<H", 0xFFF0)),
     r"its node table \(lower 65520, upper \d+\) does not fit"),
    ("leaf-value-size-garbled", lambda L: (L.node + 2, struct.pack("<H", 0xFFFF)),
     r"leaf node 0 points to overflow pages \d+\.\.\d+ for its [\d,]+-byte value, outside"),
    ("leaf-overflow-page-past-last-page",
     lambda L: (L.node + 8 + L.ksize, struct.pack("<Q", L.last)),
     r"leaf node 0 points to overflow pages \d+\.\.\d+ .* outside the pages in use"),
    ("leaf-overflow-page-into-the-tree",
     lambda L: (L.node + 8 + L.ksize, struct.pack("<Q", L.leaf)),
     r"a tree page lies inside the overflow pages of a value"),
    ("leaf-overflow-runs-overlap",
     lambda L: (L.node + 8 + L.ksize, struct.pack("<Q", L.overflow + 2)),
     r"two values' overflow pages overlap"),
    ("leaf-key-size-garbled", lambda L: (L.node + 6, struct.pack("<H", 0xFFFF)),
     r"leaf node 0 \(key 65535 bytes, data 8 bytes\) runs past the page"),
    ("leaf-node-offset-garbled", lambda L: (L.leaf * PS + 16, struct.pack("<H", 0xFFF0)),
     r"node 0 at offset 65520 lies outside the page's node area"),
    ("leaf-flags-garbled", lambda L: (L.leaf * PS + 10, struct.pack("<H", 4)),
     r"a tree page with flags 0x4"),
    ("leaf-own-page-number-wrong", lambda L: (L.leaf * PS, struct.pack("<Q", L.leaf + 7)),
     r"its header says it is page \d+"),
    ("root-page-zeroed", lambda L: (L.root * PS, bytes(PS)), r"its header says it is page 0"),
]


@pytest.mark.parametrize("name,where,says", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_refused_before_mapping(sound: Path, tmp_path: Path, name, where, says):
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    data = db / "data.mdb"
    found = layout(data)
    assert found.branch > 0 and found.leaf != found.root, "the fixture needs a branch page"
    patch(data, *where(found))
    with pytest.raises(ImagenetError) as info:
        LmdbReader(db)
    message = str(info.value)
    assert message.startswith(f"{data}: page "), message
    assert "the database is corrupt; rebuild it (imagenet convert-imageset)" in message
    assert re.search(says, message), message


def test_real_caffe_lmdb_passes_and_a_corrupted_copy_is_refused(golden: Path, tmp_path: Path):
    """Caffe's own LMDB (a copy: the goldens are read-only) has a branch root: it passes; a
    branch child aimed past the pages in use is refused."""
    db = tmp_path / "train_encoded_raw_lmdb"
    shutil.copytree(golden / "train_encoded_raw_lmdb", db)
    (db / "data.mdb").chmod(0o644)
    lmdb_verify._verified.clear()
    check_data_file(db)
    found = layout(db / "data.mdb")
    assert found.branch > 0
    patch(db / "data.mdb", found.child, _pgno16(found.last + 1))
    with pytest.raises(ImagenetError, match=r"page \d+: branch node 1 points to page"):
        LmdbReader(db)


def test_sound_databases_pass(tmp_path: Path) -> None:
    """Empty; one inline leaf; random put order over many commits with values replaced (pages
    freed and reused, so free pages lie between the tree's): all pass and read back."""
    with LmdbWriter(tmp_path / "empty"):
        pass
    check_data_file(tmp_path / "empty")
    with LmdbWriter(tmp_path / "small") as writer:
        writer.put(b"k", b"v")
    with LmdbReader(tmp_path / "small") as reader:
        assert list(reader) == [(b"k", b"v")]
    keys = [f"{(i * 7919) % 400:08d}".encode() for i in range(400)]
    with LmdbWriter(tmp_path / "shuffled", commit_every=37) as writer:
        for key in keys:
            writer.put(key, key * 500)
    with lmdb.open(str(tmp_path / "shuffled"), map_size=1 << 26) as env, \
            env.begin(write=True) as txn:
        for key in keys[::3]:
            txn.put(key, b"x" * 9000)
    with LmdbReader(tmp_path / "shuffled") as reader:
        assert len(reader) == 400


def test_a_verified_database_is_walked_once_per_process(sound: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """The several opens of one run walk the tree once; a database that changed (a new
    transaction, another size or mtime) is walked again."""
    walks = []
    real = lmdb_verify.check_tree
    monkeypatch.setattr(lmdb_verify, "check_tree", lambda fd, meta: walks.append(1) or
                        real(fd, meta))
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    for _ in range(3):
        LmdbReader(db).close()
    assert len(walks) == 1
    with lmdb.open(str(db), map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(b"zz", b"new")
    LmdbReader(db).close()
    assert len(walks) == 2
