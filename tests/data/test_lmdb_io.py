"""data.lmdb_io: atomic self-growing writer, reader, content digest; Caffe's LMDBs read exactly."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lmdb
import pytest

from data.datum import decode_datum_bytes, parse_datum_header
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, LmdbWriter, clean_stale_partials, lmdb_content_digest

GOLDEN_LMDBS = ["train_lmdb", "val_lmdb", "train_gray_lmdb", "train_64_lmdb", "val_64_lmdb",
                "bad_lmdb", "train_encoded_lmdb", "train_encoded_raw_lmdb"]


def _records(n: int, size: int = 100) -> list[tuple[bytes, bytes]]:
    return [(f"{i:08d}_k".encode(), bytes([i % 256]) * size) for i in range(n)]


@pytest.mark.parametrize("name", GOLDEN_LMDBS)
def test_reads_every_golden_lmdb_exactly(golden: Path, name: str) -> None:
    meta = json.loads((golden / f"{name}.json").read_text())
    with LmdbReader(golden / name) as reader:
        assert len(reader) == meta["count"]
        records = list(reader)
        assert [k.decode() for k in reader.keys()] == [r["key"] for r in meta["records"]]
        for (key, value), rec in zip(records, meta["records"]):
            assert key.decode() == rec["key"]
            assert len(value) == rec["value_bytes"]
            assert reader.get(key) == value
            arr, label = decode_datum_bytes(value)
            assert label == rec["label"]
            # data_sha256 is over Datum.data: raw pixels or encoded bytes.
            if rec["encoded"]:
                head = parse_datum_header(value)
                data = value[head.data_offset:head.data_offset + head.data_length]
            else:
                data = arr.tobytes()
                assert arr.shape == (rec["channels"], rec["height"], rec["width"])
            assert len(data) == rec["data_bytes"]
            assert hashlib.sha256(data).hexdigest() == rec["data_sha256"], key
        assert reader.get(b"no such key") is None


def test_write_then_read_in_key_order(tmp_path: Path) -> None:
    records = _records(25)
    db = tmp_path / "db"
    with LmdbWriter(db, commit_every=7) as writer:
        for key, value in reversed(records):  # put order does not matter, keys sort
            writer.put(key, value)
    assert db.is_dir() and (db / "data.mdb").is_file()
    with LmdbReader(db) as reader:
        assert len(reader) == 25
        assert list(reader) == records
        assert reader.keys() == [k for k, _ in records]
        assert reader.first() == records[0]


def test_map_grows_instead_of_map_full(tmp_path: Path) -> None:
    db = tmp_path / "db"
    records = _records(60, size=20_000)  # 1.2 MB into a 64 KiB map
    with LmdbWriter(db, map_size=1 << 16, commit_every=1000) as writer:
        for key, value in records:
            writer.put(key, value)
    assert writer.map_size > 1 << 16
    with LmdbReader(db) as reader:
        assert list(reader) == records


def test_refuses_existing_db_unless_overwrite(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with LmdbWriter(db) as writer:
        writer.put(b"a", b"old")
    with pytest.raises(ImagenetError, match="already exists.*--overwrite"):
        LmdbWriter(db)
    with LmdbWriter(db, overwrite=True) as writer:
        writer.put(b"b", b"new")
    with LmdbReader(db) as reader:
        assert list(reader) == [(b"b", b"new")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temp or old copies left


def test_failed_build_leaves_no_db(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with pytest.raises(RuntimeError):
        with LmdbWriter(db, commit_every=2) as writer:
            for key, value in _records(5):
                writer.put(key, value)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_db(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with LmdbWriter(db) as writer:
        writer.put(b"a", b"old")
    with pytest.raises(RuntimeError):
        with LmdbWriter(db, overwrite=True) as writer:
            writer.put(b"b", b"new")
            raise RuntimeError("boom")
    with LmdbReader(db) as reader:
        assert list(reader) == [(b"a", b"old")]


def test_stale_partial_builds_are_removed(tmp_path: Path) -> None:
    db = tmp_path / "db"
    dead_pid = 2**22 + 12345  # above Linux's default pid_max of 2**22: never a live process
    stale = tmp_path / f".db.partial-{dead_pid}-abcd1234"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"x")
    mine = tmp_path / f".db.partial-{os.getpid()}-live0000"
    mine.mkdir()
    other = tmp_path / ".other.partial-1-x"
    other.mkdir()
    moved_aside = tmp_path / f".db.old-{dead_pid}-abcd1234"  # an overwrite killed mid-rename
    moved_aside.mkdir()
    assert sorted(clean_stale_partials(db)) == sorted([stale, moved_aside])
    assert not stale.exists() and not moved_aside.exists()
    assert mine.exists() and other.exists()


def test_reader_rejects_what_is_not_an_lmdb(tmp_path: Path) -> None:
    with pytest.raises(ImagenetError, match="does not exist"):
        LmdbReader(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ImagenetError, match="not an LMDB"):
        LmdbReader(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImagenetError, match="not an LMDB"):
        LmdbReader(tmp_path / "file")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"not lmdb" * 100)
    with pytest.raises(ImagenetError, match="junk"):
        LmdbReader(tmp_path / "junk")


def test_digest_depends_on_records_not_on_file_bytes(tmp_path: Path) -> None:
    records = _records(40, size=3000)
    a, b = tmp_path / "a", tmp_path / "b"
    with LmdbWriter(a, commit_every=1000) as writer:
        for key, value in records:
            writer.put(key, value)
    # Same records, another map size and another commit pattern: a different data.mdb.
    env = lmdb.open(str(b), map_size=1 << 25)
    for key, value in reversed(records):
        with env.begin(write=True) as txn:
            txn.put(key, value)
    env.close()
    assert (a / "data.mdb").read_bytes() != (b / "data.mdb").read_bytes()
    assert lmdb_content_digest(a) == lmdb_content_digest(b)
    c = tmp_path / "c"
    with LmdbWriter(c) as writer:
        for key, value in records[:-1]:
            writer.put(key, value)
        writer.put(records[-1][0], records[-1][1][:-1] + b"!")
    assert lmdb_content_digest(c) != lmdb_content_digest(a)
    # Framing: moving bytes between key and value changes the digest.
    d, e = tmp_path / "d", tmp_path / "e"
    with LmdbWriter(d) as writer:
        writer.put(b"ab", b"c")
    with LmdbWriter(e) as writer:
        writer.put(b"a", b"bc")
    assert lmdb_content_digest(d) != lmdb_content_digest(e)


def test_digest_of_golden_is_stable(golden: Path) -> None:
    assert lmdb_content_digest(golden / "val_64_lmdb") == lmdb_content_digest(
        golden / "val_64_lmdb")
    assert lmdb_content_digest(golden / "val_64_lmdb") != lmdb_content_digest(
        golden / "val_lmdb")


def test_streamed_digest_matches_and_falls_back_when_keys_go_backwards(tmp_path: Path) -> None:
    records = _records(30, size=500)
    with LmdbWriter(tmp_path / "inorder", digest=True, commit_every=4) as writer:
        for key, value in records:
            writer.put(key, value)
    assert writer.content_digest() == lmdb_content_digest(tmp_path / "inorder")
    with LmdbWriter(tmp_path / "shuffled", digest=True) as writer:
        for key, value in reversed(records):
            writer.put(key, value)
    assert writer.content_digest() == lmdb_content_digest(tmp_path / "inorder")


def _small_db(path: Path, n: int = 30, size: int = 6000) -> Path:
    with LmdbWriter(path) as writer:
        for key, value in _records(n, size):
            writer.put(key, value)
    return path


@pytest.mark.parametrize("keep", [0, 100, 4096 + 100, 8192, 20_000, -4096])
def test_truncated_data_file_is_refused_before_mapping(tmp_path: Path, keep: int) -> None:
    """A data.mdb shorter than its meta page says would SIGBUS on the first read past its
    end: the reader refuses it with the sizes and what to do, at every cut."""
    db = _small_db(tmp_path / "db")
    data = db / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, keep if keep >= 0 else size + keep)
    with pytest.raises(ImagenetError, match=r"data\.mdb: .*(truncated|too short).*rebuild it"):
        LmdbReader(db)


def test_corrupt_second_meta_page_is_refused(tmp_path: Path) -> None:
    db = _small_db(tmp_path / "db", n=3)
    with open(db / "data.mdb", "r+b") as fh:
        fh.seek(4096 + 16)
        fh.write(b"\0" * 8)  # magic and version of meta page 1
    with pytest.raises(ImagenetError, match="second meta page is not LMDB's"):
        LmdbReader(db)


def test_overwrite_replaces_only_an_lmdb(tmp_path: Path) -> None:
    """--overwrite onto a folder holding anything besides data.mdb/lock.mdb, a file or a link
    is refused before any work, naming what is there; nothing of the user's is touched."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    plain = tmp_path / "notes.txt"
    plain.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(_small_db(tmp_path / "real"))
    for target, what in [(folder, "holds 'holiday.jpg'"), (plain, "is a file"),
                         (link, "is a symbolic link")]:
        with pytest.raises(ImagenetError, match=f"{what}.*--overwrite replaces only an LMDB"):
            LmdbWriter(target, overwrite=True)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"
    assert plain.read_text() == "precious" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt", "photos", "real"]
    # An LMDB is replaced.
    db = _small_db(tmp_path / "db", n=2)
    with LmdbWriter(db, overwrite=True) as writer:
        writer.put(b"k", b"v")
    with LmdbReader(db) as reader:
        assert list(reader) == [(b"k", b"v")]


def test_lmdb_errors_name_the_db_the_errno_and_what_to_do(tmp_path: Path) -> None:
    from data.lmdb_io import lmdb_errors

    with pytest.raises(ImagenetError) as info:
        with lmdb_errors(tmp_path / "db", "cannot write the LMDB"):
            raise lmdb.DiskError("mdb_txn_commit: No space left on device", 28)
    assert str(info.value) == (f"cannot write the LMDB {tmp_path / 'db'}: mdb_txn_commit: No "
                               "space left on device (ENOSPC); the disk is full; free some "
                               "space or choose another disk")
    with pytest.raises(ImagenetError, match="corrupt or not an LMDB; rebuild it"):
        with lmdb_errors(tmp_path / "db"):
            raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type", -30796)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_release_pages_drops_passed_records_from_rss(tmp_path: Path) -> None:
    """What keeps the mean's RSS flat: the pages of records read leave the resident set (and
    reading them again still gives the same bytes)."""
    from data.lmdb_io import release_pages

    db = tmp_path / "db"
    records = _records(64, size=256 * 1024)  # 16 MiB, one overflow run per record
    with LmdbWriter(db) as writer:
        for key, value in records:
            writer.put(key, value)
    with LmdbReader(db) as reader, reader.env.begin(buffers=True) as txn:
        views = [value for _, value in txn.cursor().iternext()]
        import numpy as np
        assert sum(int(np.frombuffer(v, np.uint8)[::4096].sum()) for v in views) > 0  # every page
        before = _rss_file_kib()
        released = release_pages(views)
        after = _rss_file_kib()
        assert released >= 16 * 2**20
        assert before - after >= 12 * 1024, (before, after)
        assert [bytes(v) for v in views] == [v for _, v in records]
