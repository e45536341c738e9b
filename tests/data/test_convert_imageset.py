"""convert_imageset: Caffe's LMDBs rebuilt exactly; workers, shuffle, bad input, kills, CLI."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.convert import convert_imageset, read_listing
from data.datum import decode_datum_bytes, parse_datum_header
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, lmdb_content_digest
from flows.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]

# Every LMDB real Caffe wrote in ../shared/caffe-golden, with the flags it was made with
# (README section 3).
GOLDEN_BUILDS = {
    "train_lmdb": ("train", "train.txt", dict(resize_height=256, resize_width=256)),
    "val_lmdb": ("val", "val.txt", dict(resize_height=256, resize_width=256)),
    "train_gray_lmdb": ("train", "train.txt", dict(resize_height=256, resize_width=256,
                                                   gray=True)),
    "train_64_lmdb": ("train", "train.txt", dict(resize_height=64, resize_width=64)),
    "val_64_lmdb": ("val", "val.txt", dict(resize_height=64, resize_width=64)),
    "bad_lmdb": ("bad", "bad.txt", dict(resize_height=256, resize_width=256)),
    "train_encoded_lmdb": ("train", "train.txt", dict(resize_height=256, resize_width=256,
                                                      encoded=True, encode_type="jpg")),
    "train_encoded_raw_lmdb": ("train", "train.txt", dict(encoded=True, encode_type="jpg")),
}


def _build(golden: Path, name: str, out: Path, **extra) -> object:
    folder, listing, flags = GOLDEN_BUILDS[name]
    return convert_imageset(f"{golden / folder}/", golden / listing, out, **flags, **extra)


@pytest.mark.parametrize("name", sorted(GOLDEN_BUILDS))
def test_rebuilds_caffes_lmdb_record_for_record(golden: Path, tmp_path: Path, name: str) -> None:
    result = _build(golden, name, tmp_path / name, workers=1)
    meta = json.loads((golden / f"{name}.json").read_text())
    with LmdbReader(tmp_path / name) as ours, LmdbReader(golden / name) as caffes:
        mine, theirs = list(ours), list(caffes)
    assert result.count == meta["count"] == len(mine)
    assert [k for k, _ in mine] == [k for k, _ in theirs]
    for (key, value), (_, caffe_value), rec in zip(mine, theirs, meta["records"]):
        head = parse_datum_header(value)
        data = value[head.data_offset:head.data_offset + head.data_length]
        assert key.decode() == rec["key"]
        assert head.label == rec["label"] and head.encoded == rec["encoded"]
        assert (head.channels, head.height, head.width) == (
            rec["channels"], rec["height"], rec["width"])
        assert hashlib.sha256(data).hexdigest() == rec["data_sha256"], key
        assert value == caffe_value, key  # the whole serialized Datum, byte for byte
    assert result.digest == lmdb_content_digest(golden / name)


def test_bad_listing_skips_counts_and_warns(golden: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="data.convert"):
        result = _build(golden, "bad_lmdb", tmp_path / "bad", workers=1)
    with LmdbReader(tmp_path / "bad") as reader:
        # The corrupt image's line index is not reused: the keys have a gap, as in Caffe.
        assert reader.keys() == [b"00000000_good_0001.JPEG", b"00000002_truncated_0002.JPEG"]
    assert result.count == 2 and result.total_lines == 3
    assert [(line, path) for line, path, _ in result.skipped] == [(2, "corrupt_0003.JPEG")]
    assert result.truncated == [(3, "truncated_0002.JPEG")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "corrupt_0003.JPEG" in w]) == 1
    assert len([w for w in warnings if "truncated_0002.JPEG" in w]) == 1
    assert result.summary().startswith("Processed 2 files. Skipped 1 unreadable, wrote 1 "
                                       "truncated")


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_output_is_identical_for_any_worker_count(golden: Path, tmp_path: Path,
                                                  pool: str) -> None:
    one = _build(golden, "train_64_lmdb", tmp_path / "one", workers=1)
    two = _build(golden, "train_64_lmdb", tmp_path / "two", workers=2, pool=pool)
    assert one.digest == two.digest
    assert (tmp_path / "one" / "data.mdb").read_bytes() == (
        tmp_path / "two" / "data.mdb").read_bytes()


def test_shuffle_is_reproducible_with_a_seed(golden: Path, tmp_path: Path) -> None:
    a = _build(golden, "val_64_lmdb", tmp_path / "a", shuffle=True, seed=7, workers=1)
    b = _build(golden, "val_64_lmdb", tmp_path / "b", shuffle=True, seed=7, workers=2)
    c = _build(golden, "val_64_lmdb", tmp_path / "c", shuffle=True, seed=8, workers=1)
    assert a.seed == 7 and a.digest == b.digest and a.digest != c.digest
    listed = [e.path for e in read_listing(golden / "val.txt")]
    with LmdbReader(tmp_path / "a") as reader, LmdbReader(golden / "val_64_lmdb") as caffes:
        keys = [k.decode() for k in reader.keys()]
        # Keys number the shuffled order; each record is still its image's Caffe record.
        assert [k[:9] for k in keys] == [f"{i:08d}_" for i in range(len(listed))]
        assert sorted(k[9:] for k in keys) == sorted(listed)
        assert [k[9:] for k in keys] != listed
        by_path = {k.decode()[9:]: v for k, v in caffes}
        for key, value in reader:
            assert value == by_path[key.decode()[9:]]
    unseeded = _build(golden, "val_64_lmdb", tmp_path / "d", shuffle=True, workers=1)
    assert isinstance(unseeded.seed, int)  # reported so the order can be replayed


def test_malformed_listing_names_file_and_line(golden: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("good_0001.JPEG 0\nno_label_here\n")
    with pytest.raises(ImagenetError, match=r"list.txt:2: expected '<path> <label>'"):
        convert_imageset(golden / "bad", listing, tmp_path / "db")
    listing.write_text("good_0001.JPEG 0\ngood_0001.JPEG zero\n")
    with pytest.raises(ImagenetError, match=r"list.txt:2: label 'zero' is not an integer"):
        convert_imageset(golden / "bad", listing, tmp_path / "db")
    assert not (tmp_path / "db").exists()
    listing.write_text("good_0001.JPEG 0\n\ngood_0001.JPEG 1\n")
    with pytest.raises(ImagenetError, match=r"list.txt:2: expected '<path> <label>'"):
        convert_imageset(golden / "bad", listing, tmp_path / "db")
    listing.write_text("good_0001.JPEG 0\n\n \n")  # blank lines at the end: no entries
    assert [(e.line_no, e.label) for e in read_listing(listing)] == [(1, 0)]
    # Split at the LAST space: paths may contain spaces.
    listing.write_text("dir with space/a b.JPEG 4\n")
    assert read_listing(listing)[0].path == "dir with space/a b.JPEG"
    assert read_listing(listing)[0].label == 4


# Characters Python's str.splitlines ends a line at and Caffe's std::getline does not.
NOT_LINE_ENDS = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", NOT_LINE_ENDS, ids=lambda c: f"U+{ord(c):04X}")
def test_listing_lines_end_at_newline_only(char: str, tmp_path: Path) -> None:
    """A listed name holding one of these was split into two entries (one silently wrong
    record, or a refused line); Caffe splits at '\n' only, so the name is one entry and its
    image one record, keyed by the whole name."""
    images = tmp_path / "images"
    images.mkdir()
    name = f"a{char}b.jpg"
    photo = cv2.imencode(".jpg", np.full((8, 8, 3), 99, np.uint8))[1].tobytes()
    (images / name).write_bytes(photo)
    (images / "c.jpg").write_bytes(photo)
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"c.jpg 0\n{name} 1\nc.jpg 2\r\n".encode("utf-8"))
    entries = read_listing(listing)
    assert [(e.line_no, e.path, e.label) for e in entries] == [
        (1, "c.jpg", 0), (2, name, 1), (3, "c.jpg", 2)]
    result = convert_imageset(str(images) + "/", listing, tmp_path / "db")
    assert result.count == 3 and not result.skipped
    with LmdbReader(tmp_path / "db") as reader:
        assert reader.keys() == [b"00000000_c.jpg", f"00000001_{name}".encode(),
                                 b"00000002_c.jpg"]


def test_max_skipped_fails_without_leaving_a_db(golden: Path, tmp_path: Path) -> None:
    with pytest.raises(ImagenetError, match="more than --max-skipped=0.*corrupt_0003.JPEG"):
        _build(golden, "bad_lmdb", tmp_path / "db", max_skipped=0, workers=1)
    assert list(tmp_path.iterdir()) == []
    assert _build(golden, "bad_lmdb", tmp_path / "db", max_skipped=1, workers=1).count == 2


def test_check_size(golden: Path, tmp_path: Path) -> None:
    # val/ holds 500x375, 375x500 and 500x333 images: without a resize the sizes differ.
    with pytest.raises(ImagenetError, match="--check_size: ILSVRC2012_val_.* bytes of pixels"):
        convert_imageset(golden / "val", golden / "val.txt", tmp_path / "db", check_size=True,
                         workers=1)
    assert not (tmp_path / "db").exists()
    ok = convert_imageset(golden / "val", golden / "val.txt", tmp_path / "db", check_size=True,
                          resize_height=32, resize_width=32, workers=1)
    assert ok.count == 8


def test_refuses_existing_db_unless_overwrite(golden: Path, tmp_path: Path) -> None:
    first = _build(golden, "val_64_lmdb", tmp_path / "db", workers=1)
    with pytest.raises(ImagenetError, match="already exists"):
        _build(golden, "val_64_lmdb", tmp_path / "db", workers=1)
    again = _build(golden, "val_64_lmdb", tmp_path / "db", workers=1, overwrite=True)
    assert again.digest == first.digest


def test_encoded_variants(golden: Path, tmp_path: Path) -> None:
    # --encode_type=png re-encodes every image (the extension never matches), losslessly.
    png = convert_imageset(golden / "val", golden / "val.txt", tmp_path / "png",
                           encode_type="png", resize_height=32, resize_width=32, workers=1)
    raw = convert_imageset(golden / "val", golden / "val.txt", tmp_path / "raw",
                           resize_height=32, resize_width=32, workers=1)
    assert png.count == raw.count == 8
    with LmdbReader(tmp_path / "png") as p, LmdbReader(tmp_path / "raw") as r:
        for (_, pv), (_, rv) in zip(p, r):
            assert parse_datum_header(pv).encoded
            assert np.array_equal(decode_datum_bytes(pv)[0], decode_datum_bytes(rv)[0])
    # An encoder OpenCV lacks is refused before any image is read.
    with pytest.raises(ImagenetError, match="--encode_type='xyz': OpenCV has no encoder"):
        convert_imageset(golden / "val", golden / "val.txt", tmp_path / "xyz",
                         encode_type="xyz", workers=1)
    assert not (tmp_path / "xyz").exists()
    # No extension to guess from: the image is skipped with the reason; as no image is left,
    # the conversion fails and writes no DB.
    (tmp_path / "noext").write_bytes((golden / "bad" / "good_0001.JPEG").read_bytes())
    (tmp_path / "list.txt").write_text("noext 0\n")
    with pytest.raises(ImagenetError, match="none of the 1 images.*extension"):
        convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "g", encoded=True,
                         workers=1)
    assert not (tmp_path / "g").exists()


def test_progress_observer_sees_the_end(golden: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    _build(golden, "bad_lmdb", tmp_path / "db", workers=1,
           progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (3, 3)


def _tiny_dataset(root: Path, lines: int) -> Path:
    img = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    cv2.imwrite(str(root / "tiny.jpg"), img)
    listing = root / "list.txt"
    listing.write_text("tiny.jpg 0\n" * lines)
    return listing


def test_killed_build_leaves_no_finished_db_and_rerun_succeeds(tmp_path: Path) -> None:
    lines = 400
    listing = _tiny_dataset(tmp_path, lines)
    db = tmp_path / "db"
    # The child commits every 10 records and parks itself once 50 are done, so the kill
    # surely lands mid-build, after several commits.
    child = textwrap.dedent(f"""
        import sys, time
        from data.convert import convert_imageset
        def observe(done, total):
            if done >= 50:
                print("MIDWAY", done, flush=True)
                time.sleep(120)
        convert_imageset({str(tmp_path)!r}, {str(listing)!r}, {str(db)!r}, workers=1,
                         commit_every=10, progress=observe)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MIDWAY"), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not db.exists()  # nothing that looks finished at the target
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".db.partial-")]
    assert len(partials) == 1 and (partials[0] / "data.mdb").is_file()
    result = convert_imageset(tmp_path, listing, db, workers=1)
    assert result.count == lines
    with LmdbReader(db) as reader:
        assert len(reader) == lines
    assert not partials[0].exists()  # the dead build's leftovers were cleaned up


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli_main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_with_caffe_spellings(golden: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    db = str(tmp_path / "db")
    # create_imagenet.sh's own argument list: a bare --shuffle right before the positionals.
    rc, out, err = _cli(capsys, "convert-imageset", "--resize_height=64", "-resize_width=64",
                        "--shuffle", "--seed=3", f"{golden}/val/", str(golden / "val.txt"), db)
    assert rc == 0, err
    assert "Processed 8 files." in out and "A total of 8 images." in err
    with LmdbReader(db) as reader:
        assert len(reader) == 8 and decode_datum_bytes(reader.first()[1])[0].shape == (3, 64, 64)
    rc, _, err = _cli(capsys, "convert-imageset", f"{golden}/val/", str(golden / "val.txt"), db)
    assert rc == 1 and "already exists" in err
    rc, _, err = _cli(capsys, "convert-imageset", "--backend=leveldb", f"{golden}/val/",
                      str(golden / "val.txt"), str(tmp_path / "other"))
    assert rc == 1 and "leveldb is not supported" in err
    rc, _, err = _cli(capsys, "convert-imageset", "--backend=rocksdb", f"{golden}/val/",
                      str(golden / "val.txt"), str(tmp_path / "other"))
    assert rc == 1 and "valid: ['leveldb', 'lmdb']" in err
    rc, _, err = _cli(capsys, "convert-imageset", "--max-skipped=0", "--resize_height=8",
                      "--resize_width=8", f"{golden}/bad/", str(golden / "bad.txt"),
                      str(tmp_path / "bad"))
    assert rc == 1 and "corrupt_0003.JPEG" in err and not (tmp_path / "bad").exists()
    rc, _, err = _cli(capsys, "convert-imageset", "--resize_height=abc", "a", "b", "c")
    assert rc == 2
    rc, _, err = _cli(capsys, "convert-imageset", f"{golden}/val/",
                      str(tmp_path / "missing.txt"), str(tmp_path / "x"))
    assert rc == 1 and "missing.txt" in err


def test_listing_labels_must_fit_int32(tmp_path: Path) -> None:
    """Caffe's atoi() wraps 99999999999 to 1215752191 silently; we refuse it with the line."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg {-2**31}\nb.jpg {2**31 - 1}\n")
    assert [e.label for e in read_listing(listing)] == [-2**31, 2**31 - 1]
    for label in (2**31, -2**31 - 1, 99999999999):
        listing.write_text(f"a.jpg 0\nb.jpg {label}\n")
        with pytest.raises(ImagenetError, match=rf"list\.txt:2: label {label} does not fit"):
            read_listing(listing)


def test_listing_byte_order_mark_is_not_part_of_the_first_path(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.jpg 0\r\nb.jpg 1\r\n".encode("utf-8"))
    assert [(e.path, e.label) for e in read_listing(listing)] == [("a.jpg", 0), ("b.jpg", 1)]
