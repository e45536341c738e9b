"""compute_image_mean: the per-pixel mean over every Datum in an LMDB, as Caffe computes it.

Reproduces tools/compute_image_mean.cpp: sum every record (encoded ones decoded natively,
float_data ones as floats), divide by the count, write a BlobProto with the legacy fields
num=1, channels, height, width and float data (C x H x W, BGR), log the per-channel means.

Caffe adds each uint8 record into a float32 sum, one record after the other. Two ways to sum
(ACCUMULATIONS):
- "exact" (default): exact integer sums, computed on several threads while the reader walks
  the map in place: each thread adds into its own float32 sum (exact below 2**24, so folded
  into float64 every RECORDS_PER_FLOAT32_SUM records); then float32(sum) / float32(N) like
  Caffe. Bit for bit Caffe's result while Caffe's
  float32 running sums are exact, i.e. N * 255 < 2**24 (N <= 65,793 records); beyond that
  Caffe's sum starts rounding and this one stays exact.
- "caffe": Caffe's own float32 running sum in key order, single-threaded: Caffe's file bit for
  bit at any N (ImageNet's 1.28 M records included), rounding and all.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from data.convert import available_cores
from data.datum import decode_datum_bytes, parse_datum_header, raw_datum_prefix, write_blobproto
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader
from data.progress import Progress

ACCUMULATIONS = {
    "exact": "exact integer sums on threads; equals Caffe's float32 sums up to 65,793 records",
    "caffe": "Caffe's float32 running sum in key order: Caffe's bits at any size, one thread",
}
# Records per task handed to a thread: small enough to keep every thread busy from the start
# and to balance the end.
RECORDS_PER_PARTIAL = 64
# Records a float32 running sum takes before it is folded into float64: the sum stays exact
# while it is below 2**24, i.e. up to 65,793 records of 255.
RECORDS_PER_FLOAT32_SUM = 65_536
# Partial sums in flight per thread: keeps the threads fed without holding many at once.
PARTIALS_IN_FLIGHT_PER_THREAD = 2
# What ends a raw record written by Caffe (or by us): label (field 5) ... encoded=false (7).
_RAW_TAIL_START, _RAW_TAIL_END, _MAX_RAW_TAIL = b"\x28", b"\x38\x00", 13


@dataclass
class MeanResult:
    mean: np.ndarray  # float32 (C, H, W)
    channel_means: list[float]
    count: int
    output_file: Path | None
    seconds: float = 0.0

    def log_lines(self) -> list[str]:
        """Caffe's closing log (compute_image_mean.cpp), with glog's 6 significant digits."""
        lines = [f"Processed {self.count} files.", f"Number of channels: {len(self.channel_means)}"]
        lines += [f"mean_value channel [{c}]: {m:.6g}" for c, m in enumerate(self.channel_means)]
        return lines


def _shape_error(key: bytes, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    return (f"record {bytes(key).decode('utf-8', 'replace')!r} has shape {list(got)} but the "
            f"first record has {list(want)}: every record must have the same shape to average "
            f"(convert with --resize_height/--resize_width)")


def _decode_checked(key: bytes, value: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    arr, _ = decode_datum_bytes(value)
    if arr.shape != shape:
        raise ImagenetError(_shape_error(key, arr.shape, shape))
    return arr.reshape(-1)


def _accumulate(total: np.ndarray, pixels: np.ndarray) -> None:
    # cv2.accumulate adds uint8 into float32 with SIMD and without the GIL, about twice as
    # fast as numpy's mixed-type add; each element is one IEEE float32 add, as in Caffe.
    cv2.accumulate(pixels.reshape(1, -1), total)


class _ThreadSums:
    """One float32 accumulator per worker thread, so tasks add without allocating, folding or
    locking; each is folded into an exact float64 total before it could start rounding."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()
        self._all: list[list] = []  # [float32 running sum, records in it, float64 total]
        self._lock = threading.Lock()

    def _mine(self) -> list:
        state = getattr(self._local, "state", None)
        if state is None:
            state = [np.zeros((1, self.size), np.float32), 0, np.zeros((1, self.size))]
            self._local.state = state
            with self._lock:
                self._all.append(state)
        return state

    def add(self, pixels: list[np.ndarray]) -> None:
        state = self._mine()
        if state[1] + len(pixels) > RECORDS_PER_FLOAT32_SUM:
            np.add(state[2], state[0], out=state[2])
            state[0][:] = 0
            state[1] = 0
        for arr in pixels:
            _accumulate(state[0], arr)
        state[1] += len(pixels)

    def total(self) -> np.ndarray:
        out = np.zeros((1, self.size))
        for running, _, folded in self._all:
            out += folded
            out += running
        return out


def _sum_raw(sums: _ThreadSums, views: list[np.ndarray], shape: tuple[int, ...]) -> None:
    sums.add(views)


def _sum_encoded(sums: _ThreadSums, records: list[tuple[bytes, memoryview]],
                 shape: tuple[int, ...]) -> None:
    sums.add([_decode_checked(key, value, shape) for key, value in records])


def _channel_means(mean: np.ndarray) -> list[float]:
    # compute_image_mean.cpp sums each channel of the mean in float, one pixel after the other,
    # then divides by H*W in float: cumsum is that sequential float32 sum.
    dim = np.float32(mean.shape[1] * mean.shape[2])
    return [float(np.cumsum(mean[c].ravel(), dtype=np.float32)[-1] / dim)
            for c in range(mean.shape[0])]


class _Summer:
    """Adds records one by one: uint8 pixels to an exact sum (batched onto threads) or to
    Caffe's float32 running sum; float_data always to a float32 running sum."""

    def __init__(self, shape: tuple[int, ...], accumulation: str, pool: ThreadPoolExecutor,
                 in_flight: int) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.caffe = accumulation == "caffe"
        self.pool = pool
        self.in_flight = in_flight
        self.thread_sums = _ThreadSums(self.size)
        self.float_sum = np.zeros((1, self.size), dtype=np.float32)
        self.batch: list = []
        self.batch_encoded = False
        self.pending: list[Future] = []

    def add_raw(self, view: np.ndarray) -> None:
        if self.caffe:
            _accumulate(self.float_sum, view)
        else:
            self._queue(False, view)

    def add_encoded(self, key: bytes, value: memoryview) -> None:
        if self.caffe:
            _accumulate(self.float_sum, _decode_checked(key, value, self.shape))
        else:
            self._queue(True, (key, value))  # decoded and shape-checked on the threads

    def add_float(self, arr: np.ndarray) -> None:
        np.add(self.float_sum, arr.reshape(1, -1), out=self.float_sum)

    def _queue(self, encoded: bool, item: object) -> None:
        if encoded != self.batch_encoded:
            self.flush()
            self.batch_encoded = encoded
        self.batch.append(item)
        if len(self.batch) >= RECORDS_PER_PARTIAL:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            task = _sum_encoded if self.batch_encoded else _sum_raw
            self.pending.append(self.pool.submit(task, self.thread_sums, list(self.batch),
                                                 self.shape))
            self.batch.clear()
        while len(self.pending) >= self.in_flight:
            self._fold(self.pending.pop(0))

    def _fold(self, future: Future) -> None:
        future.result()  # raises what the task raised (a shape error, say)

    def finish(self) -> np.ndarray:
        self.flush()
        while self.pending:
            self._fold(self.pending.pop(0))
        exact = self.thread_sums.total()
        if not exact.any():
            return self.float_sum
        return exact.astype(np.float32) + self.float_sum

    def cancel(self) -> None:
        for future in self.pending:
            future.cancel()


def compute_image_mean(
    db_path: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    threads: int | None = None,
    accumulation: str = "exact",
    show_progress: bool | None = None,
) -> MeanResult:
    """Mean image of an LMDB of Datums; written to `output_file` (atomically) when given."""
    started = time.monotonic()
    if accumulation not in ACCUMULATIONS:
        raise ImagenetError(f"unknown accumulation {accumulation!r}; valid: "
                            f"{sorted(ACCUMULATIONS)}")
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise ImagenetError(f"threads must be >= 1, got {threads}")
    with LmdbReader(db_path) as reader:
        total = len(reader)
        first = reader.first()
        if first is None:
            raise ImagenetError(f"{db_path}: the LMDB holds no records, there is nothing to "
                                f"average")
        shape = decode_datum_bytes(first[1])[0].shape
        size = int(np.prod(shape))
        # Caffe's raw records all start with the same bytes (channels, height, width, data
        # length): recognising them by that prefix skips the field walk for nearly every record.
        prefix = raw_datum_prefix(shape)
        plen = len(prefix)
        count = 0
        # The read transaction spans the whole sum: the buffers handed to the threads point
        # into the map and stay valid only while it is open.
        with reader.env.begin(buffers=True) as txn, \
                ThreadPoolExecutor(max_workers=threads) as pool, \
                Progress(total, desc="compute_image_mean", unit="rec", enabled=show_progress,
                         on_update=progress) as bar:
            summer = _Summer(shape, accumulation, pool, threads * PARTIALS_IN_FLIGHT_PER_THREAD)
            try:
                for key, value in txn.cursor().iternext(keys=True, values=True):
                    count += 1
                    bar.update()
                    tail = len(value) - plen - size
                    if (0 < tail <= _MAX_RAW_TAIL and value[:plen] == prefix
                            and value[plen + size:plen + size + 1] == _RAW_TAIL_START
                            and value[-2:] == _RAW_TAIL_END):
                        summer.add_raw(np.frombuffer(value, np.uint8, size, plen))
                        continue
                    head = parse_datum_header(value)
                    if head.has_float_data or (head.data_length == 0 and not head.encoded):
                        summer.add_float(_decode_checked(key, bytes(value), shape))
                    elif head.encoded:
                        summer.add_encoded(bytes(key), value)
                    else:
                        rec_shape = (head.channels, head.height, head.width)
                        if rec_shape != shape or head.data_length != size:
                            raise ImagenetError(_shape_error(key, rec_shape, shape))
                        summer.add_raw(np.frombuffer(value, np.uint8, size, head.data_offset))
                total_sum = summer.finish()
            finally:
                summer.cancel()  # the pool's shutdown then waits for running ones
    # compute_image_mean.cpp: sum_blob.data(i) / count, in float.
    mean = (total_sum / np.float32(count)).astype(np.float32).reshape(shape)
    out = None
    if output_file is not None:
        out = Path(output_file)
        write_blobproto(out, mean, legacy_4d=True)
    return MeanResult(mean, _channel_means(mean), count, out, time.monotonic() - started)
