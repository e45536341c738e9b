"""The mean for free: Caffe's per-pixel float32 sums of the records a conversion writes, kept
on disk beside the LMDB so that the mean stage need not read the database again.

compute_image_mean (data/mean.py, tools/compute_image_mean.cpp) divides Caffe's float32
running sum of every record, added in key order, by the count. Past 65,793 records that sum
rounds, and how depends on the order, so the conversion keeps the same running sum in the same
order: the one ordered writer hands each raw record it puts (in key order) to PixelSums, which
adds the record's pixels (C x H x W, straight from the Datum's bytes) on a thread of its own
(data.mean.RunningSum). `mean = float32 sum / float32(count)` is then compute_image_mean's
default ("caffe") file bit for bit, at any record count.

The sums file (`<lmdb>.pixel-sum.npz`, written atomically) records the content digest of the
LMDB it was summed from: a reader uses it only when that digest is the LMDB's current one.
"""
from __future__ import annotations

import io
import os
import queue
import threading
from pathlib import Path

import numpy as np

from data.atomic import remove_stale_temps, write_bytes_atomic
from data.datum import raw_datum_prefix
from data.errors import ImagenetError
from data.mean import RECORDS_PER_ORDERED_CHUNK, RunningSum, SavedSum

SUFFIX = ".pixel-sum.npz"
# 2: Caffe's float32 running sum in key order (1 held exact float64 sums, which differ from
# Caffe's past 65,793 records: such a file is not used, and the mean is read from the LMDB).
_FORMAT_VERSION = 2
# Records waiting for the summing thread at most (each a reference to a Datum the writer holds
# anyway): bounds memory when the sum falls behind the writer.
QUEUED_RECORDS = 4 * RECORDS_PER_ORDERED_CHUNK


class PixelSums:
    """Caffe's float32 running sum of raw records of one shape, added in the order given (the
    writer's key order) on a background thread; use as a context manager, or close()."""

    def __init__(self, chw: tuple[int, int, int]) -> None:
        self.chw = tuple(int(d) for d in chw)
        self._size = int(np.prod(self.chw))
        self._prefix = raw_datum_prefix(self.chw)
        self._running = RunningSum(self._size)
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(
            QUEUED_RECORDS // RECORDS_PER_ORDERED_CHUNK)
        self._batch: list[bytes] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pixel-sum", daemon=True)
        self._thread.start()

    def add(self, value: bytes) -> bool:
        """Queue one record's serialized Datum (as the writer puts it); False (and nothing
        added) when it is not a raw record of this shape."""
        plen = len(self._prefix)
        if len(value) < plen + self._size or value[:plen] != self._prefix:
            return False
        self._batch.append(value)
        if len(self._batch) == RECORDS_PER_ORDERED_CHUNK:
            self._put(self._batch)
            self._batch = []
        return True

    def _put(self, batch: list[bytes] | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def _run(self) -> None:
        plen, size = len(self._prefix), self._size
        while (batch := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._running.add([np.frombuffer(v, np.uint8, size, plen) for v in batch])
                except BaseException as err:  # noqa: BLE001 - raised to the caller
                    self._error = err

    def total(self) -> np.ndarray:
        """The float32 running sum (C x H x W) of every record added; ends the thread."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._running.sum.reshape(self.chw).copy()

    @property
    def count(self) -> int:
        return self._running.count

    def close(self) -> None:
        if self._thread.is_alive():
            if self._batch:
                self._queue.put(self._batch)
                self._batch = []
            self._queue.put(None)
            self._thread.join()
        self._running.close()

    def __enter__(self) -> "PixelSums":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sum_path(db_path: str | os.PathLike) -> Path:
    """Where the sums of the LMDB at `db_path` live: beside it, named after it."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + SUFFIX)


def save(path: str | os.PathLike, total: np.ndarray, count: int, digest: str) -> Path:
    """Write the sums atomically (data.atomic: temporary name + rename), first removing the
    temporaries of writers killed before their rename (a rerun after a kill leaves nothing)."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, version=np.int64(_FORMAT_VERSION), total=np.asarray(total, np.float32),
             count=np.int64(count), digest=np.str_(digest))
    remove_stale_temps(path.parent, path.name)
    write_bytes_atomic(path, buf.getvalue(), durable=False)
    return path


def load(path: str | os.PathLike) -> SavedSum | None:
    """The saved sums, or None when the file is absent or unreadable (the caller recomputes)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _FORMAT_VERSION:
                return None
            total = z["total"]
            if total.dtype != np.float32 or total.ndim != 3:
                return None
            return SavedSum(total, int(z["count"]), str(z["digest"]))
    except (OSError, KeyError, ValueError):
        return None


def mean_of(total: np.ndarray, count: int) -> np.ndarray:
    """compute_image_mean's mean from Caffe's float32 sum: sum / float32(count), bit for bit
    its default ("caffe") result."""
    if count < 1:
        raise ImagenetError("no records were summed: there is nothing to average")
    return np.divide(total.astype(np.float32), np.float32(count))
