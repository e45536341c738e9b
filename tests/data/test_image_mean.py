"""compute_image_mean: Caffe's mean.binaryproto reproduced bit for bit; errors; CLI."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from data.datum import decode_datum_bytes, encode_datum_bytes, encoded_datum_bytes, read_blobproto
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, LmdbWriter
import data.mean as mean_module
from data.mean import RECORDS_PER_CHUNK, compute_image_mean
from data.proto import caffe_pb2
from flows.cli import main as cli_main


@pytest.mark.parametrize("db, mean_file, logged", [
    ("train_lmdb", "mean.binaryproto", ["74.4029", "88.6627", "142.696"]),
    ("train_64_lmdb", "mean_64.binaryproto", ["74.3874", "88.652", "142.669"]),
])
def test_mean_of_caffes_lmdb_is_caffes_mean(golden: Path, tmp_path: Path, db: str,
                                            mean_file: str, logged: list[str]) -> None:
    out = tmp_path / "mean.binaryproto"
    caffe_mean = read_blobproto(golden / mean_file)[0]
    exact_way = compute_image_mean(golden / db, accumulation="exact", threads=2)
    assert np.array_equal(exact_way.mean, caffe_mean)
    result = compute_image_mean(golden / db, out, threads=2)
    assert result.count == 25 and result.mean.dtype == np.float32
    # The brief allows 1e-3; float32(sum of uint8) / float32(N) is Caffe's arithmetic exactly
    # (README section 4), so we hold ourselves to bit equality.
    assert np.array_equal(result.mean, caffe_mean)
    assert out.read_bytes() == (golden / mean_file).read_bytes()
    # compute_image_mean.cpp's log lines, digits as glog prints them.
    assert result.log_lines()[2:] == [f"mean_value channel [{c}]: {v}"
                                      for c, v in enumerate(logged)]


def test_mean_of_gray_and_encoded_records(golden: Path) -> None:
    gray = compute_image_mean(golden / "train_gray_lmdb")
    assert gray.mean.shape == (1, 256, 256) and gray.count == 25
    # Encoded records are decoded (natively, like Caffe's DecodeDatumNative) and averaged.
    encoded = compute_image_mean(golden / "train_encoded_lmdb", threads=2)
    with LmdbReader(golden / "train_encoded_lmdb") as reader:
        total = sum(decode_datum_bytes(v)[0].astype(np.float64) for _, v in reader)
    assert np.array_equal(encoded.mean, (total.astype(np.float32) / np.float32(25)))


def test_different_shapes_name_the_first_offending_key(golden: Path) -> None:
    # Without a resize the encoded-raw DB holds images of several sizes.
    with pytest.raises(ImagenetError, match=r"'00000001_n01440764/n01440764_5109.JPEG' has "
                                            r"shape \[1, 333, 500\]"):
        compute_image_mean(golden / "train_encoded_raw_lmdb")


def test_raw_shape_mismatch_and_empty_db(tmp_path: Path) -> None:
    with LmdbWriter(tmp_path / "mixed") as writer:
        writer.put(b"a", encode_datum_bytes(np.zeros((3, 4, 4), np.uint8), 0))
        writer.put(b"b", encode_datum_bytes(np.zeros((3, 4, 5), np.uint8), 0))
    with pytest.raises(ImagenetError, match=r"record 'b' has shape \[3, 4, 5\].*\[3, 4, 4\]"):
        compute_image_mean(tmp_path / "mixed")
    with LmdbWriter(tmp_path / "empty"):
        pass
    with pytest.raises(ImagenetError, match="no records"):
        compute_image_mean(tmp_path / "empty")


def test_exact_sum_across_many_tasks_threads_and_folds(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Fold the per-thread uint16 sums every 7 records (instead of 257) and the float32 sums
    # every 70 (instead of 65,536) so that folding happens here; the many 255s would expose
    # any lost or doubled record.
    monkeypatch.setattr(mean_module, "RECORDS_PER_UINT16_SUM", 7)
    monkeypatch.setattr(mean_module, "RECORDS_PER_FLOAT32_SUM", 70)
    n = 5 * RECORDS_PER_CHUNK + 5
    rng = np.random.default_rng(1)
    recs = rng.integers(0, 256, (n, 2, 3, 3), dtype=np.uint8)
    recs[:RECORDS_PER_CHUNK + 3] = 255
    with LmdbWriter(tmp_path / "db") as writer:
        for i, rec in enumerate(recs):
            writer.put(f"{i:08d}".encode(), encode_datum_bytes(rec, i % 3))
    expected = (recs.astype(np.uint64).sum(0).astype(np.float32) / np.float32(n))
    for threads in (1, 3):
        result = compute_image_mean(tmp_path / "db", threads=threads, accumulation="exact")
        assert result.count == n and np.array_equal(result.mean, expected)


def test_uint16_sums_never_overflow(tmp_path: Path) -> None:
    # More all-255 records than one uint16 sum holds (257), on one thread and with real folds.
    n = 2 * mean_module.RECORDS_PER_UINT16_SUM + 3
    with LmdbWriter(tmp_path / "db") as writer:
        for i in range(n):
            writer.put(f"{i:08d}".encode(), encode_datum_bytes(np.full((1, 2, 2), 255, np.uint8), 0))
    result = compute_image_mean(tmp_path / "db", threads=1, accumulation="exact")
    assert result.count == n and np.array_equal(result.mean, np.full((1, 2, 2), 255, np.float32))


def test_mixed_raw_and_encoded_records(tmp_path: Path) -> None:
    img = (np.arange(4 * 6 * 3) * 7 % 256).astype(np.uint8).reshape(4, 6, 3)
    png = cv2.imencode(".png", img)[1].tobytes()
    chw = img.transpose(2, 0, 1)
    with LmdbWriter(tmp_path / "db") as writer:
        writer.put(b"0", encode_datum_bytes(chw, 0))
        writer.put(b"1", encoded_datum_bytes(png, 0))
        writer.put(b"2", encode_datum_bytes(np.zeros_like(chw), 0))
    result = compute_image_mean(tmp_path / "db")
    assert np.array_equal(result.mean, (2 * chw.astype(np.float32)) / np.float32(3))


def test_float_data_records_sum_in_float32(tmp_path: Path) -> None:
    values = [np.full((1, 2, 2), v, np.float32) for v in (0.5, 1.25, 3.0)]
    with LmdbWriter(tmp_path / "db") as writer:
        for i, v in enumerate(values):
            datum = caffe_pb2.Datum(channels=1, height=2, width=2, label=0)
            datum.float_data.extend(v.ravel().tolist())
            writer.put(f"{i}".encode(), datum.SerializeToString())
    result = compute_image_mean(tmp_path / "db")
    assert np.array_equal(result.mean, np.full((1, 2, 2), np.float32(4.75) / np.float32(3)))


def test_cli_prints_channel_means_and_writes_file(golden: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.binaryproto"
    assert cli_main(["compute-image-mean", "--backend", "lmdb", str(golden / "train_lmdb"),
                     str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean_value channel [0]: 74.4029" in printed and "Processed 25 files." in printed
    assert out.read_bytes() == (golden / "mean.binaryproto").read_bytes()
    assert cli_main(["compute-image-mean", str(golden / "val_64_lmdb")]) == 0  # print only
    assert "Number of channels: 3" in capsys.readouterr().out
    assert cli_main(["compute-image-mean", str(tmp_path / "nope")]) == 1
    assert "no such LMDB" in capsys.readouterr().err
    assert cli_main(["compute-image-mean", "-backend=leveldb", str(golden / "train_lmdb")]) == 1
    assert "not supported" in capsys.readouterr().err


def _bright_db(path: Path, n: int, seed: int = 3) -> np.ndarray:
    """n records of 3x8x8 bright pixels (200-255), as the issue's 100,000-record example: their
    float32 running sums pass 2**24 around record 70,000. Returns the records (n, 192)."""
    rng = np.random.default_rng(seed)
    pictures = rng.integers(200, 256, (16, 3, 8, 8), dtype=np.uint8)
    order = rng.integers(0, len(pictures), n)
    values = [encode_datum_bytes(p, 0) for p in pictures]
    with LmdbWriter(path, commit_every=50_000) as writer:
        for i, k in enumerate(order):
            writer.put(f"{i:08d}".encode(), values[k])
    return pictures.reshape(len(pictures), -1)[order]


def test_default_mean_is_caffes_float32_running_sum_past_65793_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caffe adds every record into a float32 sum in key order; past 2**24 each add rounds.
    100,000 records: the default mean equals that sequential sum (np.cumsum over axis 0 adds
    one row after the other in float32), on any number of threads (each thread a slice of the
    pixels: 12 elements per slice here, so 3 threads really split), while "exact" differs."""
    n = 100_000
    records = _bright_db(tmp_path / "db", n)
    running = np.cumsum(records.astype(np.float32), axis=0, dtype=np.float32)[-1]
    caffe = (running / np.float32(n)).reshape(3, 8, 8)
    exact = (records.astype(np.float64).sum(0).astype(np.float32) / np.float32(n)).reshape(3, 8, 8)
    differ = int((caffe != exact).sum())
    assert differ > 150, differ  # the issue saw 190 of 192 values differ
    monkeypatch.setattr(mean_module, "MIN_ELEMENTS_PER_SLICE", 12)
    for threads in (1, 3):
        result = compute_image_mean(tmp_path / "db", threads=threads)
        assert result.count == n and np.array_equal(result.mean, caffe), threads
    assert np.array_equal(compute_image_mean(tmp_path / "db", accumulation="exact").mean, exact)
    with pytest.raises(ImagenetError, match=r"valid: \['caffe', 'exact'\]"):
        compute_image_mean(tmp_path / "db", accumulation="double")


def test_cli_default_writes_caffes_mean_past_65793_records(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    n = 80_000
    records = _bright_db(tmp_path / "db", n, seed=4)
    running = np.cumsum(records.astype(np.float32), axis=0, dtype=np.float32)[-1]
    out = tmp_path / "mean.binaryproto"
    assert cli_main(["compute-image-mean", str(tmp_path / "db"), str(out)]) == 0
    assert np.array_equal(read_blobproto(out).ravel(), running / np.float32(n))
    assert cli_main(["compute-image-mean", "--accumulation=exact", str(tmp_path / "db"),
                     str(tmp_path / "exact.binaryproto")]) == 0
    assert out.read_bytes() != (tmp_path / "exact.binaryproto").read_bytes()
    assert f"Processed {n} files." in capsys.readouterr().out


def test_encoded_and_float_records_in_caffes_order(tmp_path: Path, monkeypatch) -> None:
    """The ordered sum decodes encoded records on threads and keeps key order; a float_data
    record among uint8 ones is added where it stands (forced here below 65,793 records)."""
    monkeypatch.setattr(mean_module, "CAFFE_EXACT_RECORDS", 0)
    img = (np.arange(4 * 6 * 3) * 7 % 256).astype(np.uint8).reshape(4, 6, 3)
    png = cv2.imencode(".png", img)[1].tobytes()
    chw = img.transpose(2, 0, 1)
    floats = caffe_pb2.Datum(channels=3, height=4, width=6, label=0)
    floats.float_data.extend((np.arange(72) * 0.1 + 0.05).astype(np.float32).tolist())
    values = [encode_datum_bytes(chw, 0), encoded_datum_bytes(png, 0),
              floats.SerializeToString(), encoded_datum_bytes(png, 0)] * 40
    with LmdbWriter(tmp_path / "db") as writer:
        for i, v in enumerate(values):
            writer.put(f"{i:08d}".encode(), v)
    flat = [chw.ravel().astype(np.float32), chw.ravel().astype(np.float32),
            np.array(floats.float_data, np.float32), chw.ravel().astype(np.float32)] * 40
    running = np.cumsum(np.stack(flat), axis=0, dtype=np.float32)[-1]
    for threads in (1, 2):
        result = compute_image_mean(tmp_path / "db", threads=threads)
        assert np.array_equal(result.mean.ravel(), running / np.float32(len(values)))
    monkeypatch.setattr(mean_module, "CAFFE_EXACT_RECORDS", 10**6)  # exact pass, then redone
    assert np.array_equal(compute_image_mean(tmp_path / "db").mean.ravel(),
                          running / np.float32(len(values)))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_corrupt_page_met_mid_walk_is_an_error_not_a_partial_mean(tmp_path: Path,
                                                                    monkeypatch, threads) -> None:
    """LMDB raises (MDB_PAGE_NOTFOUND, MDB_CORRUPTED) from the cursor walk when a branch page
    is damaged; that used to kill the summing thread with a traceback and write the mean of
    the records before it, with exit 0."""
    import threading

    import lmdb

    db = tmp_path / "db"
    with LmdbWriter(db) as writer:
        for i in range(200):
            writer.put(f"{i:08d}".encode(), encode_datum_bytes(np.full((1, 2, 2), i % 256,
                                                                       np.uint8), 0))
    real_init = mean_module._SharedCursor.__init__

    def damaged(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        records = self._records

        def walk():
            for n, record in enumerate(records):
                if n == 70:
                    raise lmdb.PageNotFoundError("mdb_cursor_get: MDB_PAGE_NOTFOUND", -30797)
                yield record
        self._records = walk()

    monkeypatch.setattr(mean_module._SharedCursor, "__init__", damaged)
    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with pytest.raises(ImagenetError, match=r"reading LMDB .*db: .*MDB_PAGE_NOTFOUND.*rebuild"):
        compute_image_mean(db, tmp_path / "mean.binaryproto", threads=threads)
    assert not died and not (tmp_path / "mean.binaryproto").exists()


# What `imagenet compute-image-mean` on raw records must not import: it uses none of them, and
# each costs the whole process more than summing 1000 records (benchmarks/README.md).
UNUSED_BY_THE_MEAN = ("cv2", "google.protobuf", "jax", "prefect", "urllib.request",
                      "multiprocessing", "data.convert", "data.pixelsum")


def test_cli_imports_only_what_the_mean_uses(tmp_path: Path) -> None:
    import subprocess
    import sys

    with LmdbWriter(tmp_path / "db") as writer:
        for i in range(3):
            writer.put(f"{i:08d}".encode(), encode_datum_bytes(np.full((3, 4, 4), i, np.uint8), 0))
    probe = ("import sys; from flows.cli import main; "
             f"assert main(['compute-image-mean', {str(tmp_path / 'db')!r}, "
             f"{str(tmp_path / 'm.binaryproto')!r}]) == 0; "
             f"print(sorted(m for m in {UNUSED_BY_THE_MEAN!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    assert np.array_equal(read_blobproto(tmp_path / "m.binaryproto"),
                          np.full((1, 3, 4, 4), 1, np.float32))
