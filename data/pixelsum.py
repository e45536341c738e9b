"""The mean for free: exact per-pixel sums of the records a conversion writes, kept on disk
beside the LMDB so that the mean stage need not read the database again.

compute_image_mean (data/mean.py, tools/compute_image_mean.cpp) divides the float32 sum of
every record by the count. Its default ("exact") sum is the exact integer sum rounded once to
float32, so a sum accumulated exactly while converting gives the same mean.binaryproto bit for
bit: `mean = float32(exact sum) / float32(count)`.

Each converting thread adds the uint8 pixels it decoded (H x W x C, as OpenCV hands them) into
its own float32 running sum, which is exact below 2**24 and so is folded into a float64 total
every RECORDS_PER_FLOAT32_SUM records (float64 holds integer sums exactly up to 2**53, i.e.
35 trillion records of 255). The threads' sums are added at the end and laid out C x H x W.

The sums file (`<lmdb>.pixel-sum.npz`, written atomically) records the content digest of the
LMDB it was summed from: a reader uses it only when that digest is the LMDB's current one.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data.atomic import remove_stale_temps, write_bytes_atomic
from data.errors import ImagenetError

# Records a float32 running sum takes before it is folded into float64: it stays exact while
# below 2**24, i.e. up to 65,793 records of 255 (the same bound as data/mean.py's sums).
RECORDS_PER_FLOAT32_SUM = 65_536
SUFFIX = ".pixel-sum.npz"
_FORMAT_VERSION = 1


class _ThreadPixelSum:
    """One thread's running sum (H x W x C float32, folded into float64 before it rounds)."""

    def __init__(self, hwc: tuple[int, ...]) -> None:
        self.running = np.zeros(hwc, np.float32)
        self.in_running = 0
        self.folded = np.zeros(hwc, np.float64)
        self.count = 0

    def add(self, pixels: np.ndarray) -> None:
        if self.in_running == RECORDS_PER_FLOAT32_SUM:
            self.folded += self.running
            self.running[...] = 0
            self.in_running = 0
        # One IEEE float32 add per element, SIMD and without the GIL (as in data/mean.py).
        cv2.accumulate(pixels, self.running)
        self.in_running += 1
        self.count += 1


class PixelSums:
    """Exact per-pixel sums of uint8 images of one shape, added from any number of threads
    (each thread sums into its own buffer: no lock per image)."""

    def __init__(self, chw: tuple[int, int, int]) -> None:
        c, h, w = chw
        self.chw = (int(c), int(h), int(w))
        self._hwc = (h, w) if c == 1 else (h, w, c)
        self._local = threading.local()
        self._sums: list[_ThreadPixelSum] = []
        self._lock = threading.Lock()

    def add(self, pixels: np.ndarray) -> bool:
        """Add one decoded image (H x W x C, or H x W for one channel, uint8); False (and
        nothing added) when its shape is not this sum's."""
        if pixels.dtype != np.uint8 or pixels.shape != self._hwc:
            return False
        mine = getattr(self._local, "sum", None)
        if mine is None:
            mine = self._local.sum = _ThreadPixelSum(self._hwc)
            with self._lock:
                self._sums.append(mine)
        mine.add(pixels)
        return True

    @property
    def count(self) -> int:
        with self._lock:
            return sum(s.count for s in self._sums)

    def total(self) -> np.ndarray:
        """The exact sum (float64, C x H x W) of everything added so far."""
        out = np.zeros(self._hwc, np.float64)
        with self._lock:
            for s in self._sums:
                out += s.folded
                out += s.running
        return out.reshape(self._hwc[0], self._hwc[1], -1).transpose(2, 0, 1).copy()


@dataclass(frozen=True)
class SavedSum:
    total: np.ndarray  # float64 (C, H, W), exact
    count: int
    digest: str  # lmdb_content_digest of the LMDB these records are in


def sum_path(db_path: str | os.PathLike) -> Path:
    """Where the sums of the LMDB at `db_path` live: beside it, named after it."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + SUFFIX)


def save(path: str | os.PathLike, total: np.ndarray, count: int, digest: str) -> Path:
    """Write the sums atomically (data.atomic: temporary name + rename), first removing the
    temporaries of writers killed before their rename (a rerun after a kill leaves nothing)."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, version=np.int64(_FORMAT_VERSION), total=np.asarray(total, np.float64),
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
            if total.dtype != np.float64 or total.ndim != 3:
                return None
            return SavedSum(total, int(z["count"]), str(z["digest"]))
    except (OSError, KeyError, ValueError):
        return None


def mean_of(total: np.ndarray, count: int) -> np.ndarray:
    """compute_image_mean's mean from an exact sum: float32(sum) / float32(count), bit for bit
    its default ("exact") result."""
    if count < 1:
        raise ImagenetError("no records were summed: there is nothing to average")
    total32 = total.astype(np.float32)
    return np.divide(total32, np.float32(count), out=total32)
