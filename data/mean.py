"""compute_image_mean: the per-pixel mean over every Datum in an LMDB, as Caffe computes it.

Reproduces tools/compute_image_mean.cpp: sum every record (encoded ones decoded natively,
float_data ones as floats), divide by the count, write a BlobProto with the legacy fields
num=1, channels, height, width and float data (C x H x W, BGR), log the per-channel means.

Caffe adds each record into a float32 sum, one record after the other in key order
(`sum_blob.set_data(i, sum_blob.data(i) + (uint8_t)data[i])`). Such a running sum is exact
while it stays below 2**24, i.e. for up to 65,793 records of uint8 pixels (65,793 x 255 <
2**24); past that every add rounds, and the result depends on the order of the records.
Two ways to sum (ACCUMULATIONS):
- "caffe" (default): Caffe's bytes at any record count. Up to 65,793 records it takes the
  exact path below (the same integers, so the same float32 sums) on every core; past that it
  runs Caffe's float32 running sum in key order, split by pixel, not by record: each thread
  adds every record, in key order, into its own contiguous slice of the sum (RunningSum), so
  every element sees Caffe's sequence of adds and rounds as Caffe's does.
- "exact": exact integer sums on several threads, rounded once: equal to Caffe's up to 65,793
  records, more accurate (and no longer Caffe's) past that. Each thread takes chunks of
  records from one shared cursor (views into the map, no copy) and adds them into its own
  uint16 sum (numpy's uint8 -> uint16 add needs no OpenCV import: 45-70 ms of a process that
  sums 1000 records in ~30 ms), folded every RECORDS_PER_UINT16_SUM records into a float32
  sum (exact below 2**24, so folded into float64 every RECORDS_PER_FLOAT32_SUM records); then
  float32(sum) / float32(N) like Caffe. float_data records (no Caffe tool writes them) are
  summed in float32: on one thread, in key order, when the first record is one; in a DB that
  mixes them with uint8 records, per thread.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lmdb
import numpy as np

from data.host import available_cores
from data.datum import decode_datum_bytes, parse_datum_header, raw_datum_prefix, write_blobproto
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, release_pages, release_span
from data.progress import Progress

ACCUMULATIONS = {
    "caffe": "Caffe's float32 running sum in key order, as compute_image_mean: Caffe's bytes "
             "at any record count",
    "exact": "exact integer sums rounded once to float32: Caffe's bytes up to 65,793 records, "
             "more accurate (not Caffe's) past that",
}
DEFAULT_ACCUMULATION = "caffe"
# Up to this many records of uint8 pixels a float32 running sum never rounds (255 x 65,793 <
# 2**24), so the exact integer sum, summed in any order on any number of threads, is Caffe's.
CAFFE_EXACT_RECORDS = (2**24 - 1) // 255
# Records the ordered ("caffe") sum reads per hand-out to its slice threads at least (and
# ORDERED_CHUNK_BYTES of pixels for small records): enough that the hand-off is a small share
# of the adds.
RECORDS_PER_ORDERED_CHUNK = 64
ORDERED_CHUNK_BYTES = 1 << 20
# Records below this size (LMDB's page) are stored inline in leaf pages: released by span.
SMALL_RECORD_BYTES = 4096
# Elements per slice thread at least: below this the thread hand-off costs more than the adds.
MIN_ELEMENTS_PER_SLICE = 16_384
# Records a thread takes from the shared cursor at a time: enough that the walk under the lock
# is a small share of a thread's time. Near the end chunks shrink (to a share of what is left,
# down to MIN_RECORDS_PER_CHUNK) so that the threads finish together.
RECORDS_PER_CHUNK = 32
MIN_RECORDS_PER_CHUNK = 4
# Records a uint16 sum takes before it is folded into the float32 one: 257 * 255 = 65,535.
RECORDS_PER_UINT16_SUM = 257
# Records a float32 running sum takes before it is folded into float64: the sum stays exact
# while it is below 2**24, i.e. up to 65,793 records of 255.
RECORDS_PER_FLOAT32_SUM = 65_536
# What ends a raw record written by Caffe (or by us): label (field 5) ... encoded=false (7).
_RAW_TAIL_START, _RAW_TAIL_END, _MAX_RAW_TAIL = 0x28, b"\x38\x00", 13


@dataclass(frozen=True)
class SavedSum:
    """What a conversion kept of its records (data/pixelsum.py)."""
    total: np.ndarray  # float32 (C, H, W): Caffe's running sum, in key order
    count: int
    digest: str  # lmdb_content_digest of the LMDB these records are in


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


def _key_text(key: bytes | memoryview) -> str:
    return repr(bytes(key).decode("utf-8", "replace"))


def _shape_error(key: bytes | memoryview, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    return (f"record {_key_text(key)} has shape {list(got)} but the "
            f"first record has {list(want)}: every record must have the same shape to average "
            f"(convert with --resize_height/--resize_width)")


def _decode_checked(key: bytes | memoryview, value: bytes | memoryview,
                    shape: tuple[int, ...]) -> np.ndarray:
    arr, _ = decode_datum_bytes(value)
    if arr.shape != shape:
        raise ImagenetError(_shape_error(key, arr.shape, shape))
    return arr.reshape(-1)


class _SharedCursor:
    """Hands out the records in key order, RECORDS_PER_CHUNK at a time (fewer near the end), to
    the summing threads; a chunk's views point into the map and stay valid while the
    transaction is open.

    A failing chunk stops the hand-out after it; chunks handed out before it still finish, so
    the error reported is the one of the first offending record in key order."""

    def __init__(self, txn: lmdb.Transaction, bar: Progress, expected: int, threads: int) -> None:
        self._records = txn.cursor().iternext(keys=True, values=True)
        self._expected = expected  # the DB's record count: tells how much is left
        self._shares = 2 * threads
        self._bar = bar
        self._lock = threading.Lock()
        self._next_index = 0
        self._last_index = None  # no chunk after this one is handed out (set on failure)
        self.errors: list[tuple[int, BaseException]] = []
        self.count = 0

    def take(self) -> tuple[int, list[tuple[memoryview, memoryview]]]:
        with self._lock:
            index = self._next_index
            if self._last_index is not None and index > self._last_index:
                return index, []
            left = self._expected - self.count
            size = min(RECORDS_PER_CHUNK, max(MIN_RECORDS_PER_CHUNK, -(-left // self._shares)))
            try:
                chunk = list(islice(self._records, size))
            except BaseException as err:  # a corrupt page: reported like a failing chunk
                self._fail_locked(index, err)
                return index, []
            self._next_index += 1
            self.count += len(chunk)
            self._bar.update(len(chunk))
            return index, chunk

    def fail(self, index: int, error: BaseException) -> None:
        with self._lock:
            self._fail_locked(index, error)

    def _fail_locked(self, index: int, error: BaseException) -> None:
        self.errors.append((index, error))
        self._last_index = index if self._last_index is None else min(self._last_index, index)

    def first_error(self) -> BaseException | None:
        return min(self.errors, key=lambda e: e[0])[1] if self.errors else None


class _ThreadSum:
    """One thread's exact sums: uint8 pixels go to a uint16 sum folded into a float32 one
    before it could overflow (RECORDS_PER_UINT16_SUM), which is folded into a float64 total
    before it could round (RECORDS_PER_FLOAT32_SUM); float_data records go to a float32 sum of
    their own."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.prefix = raw_datum_prefix(shape)
        self.pixels = np.zeros(self.size, np.float32)
        self.in_pixels = 0
        self.small = np.zeros(self.size, np.uint16)
        self.in_small = 0
        self.folded: np.ndarray | None = None  # float64, from the first fold on
        self.floats: np.ndarray | None = None  # float_data records

    def add_chunk(self, chunk: list[tuple[memoryview, memoryview]]) -> None:
        # The add runs in C without the GIL, one integer add per element. The Python around it
        # holds the GIL and costs a sixth as much, so the fast path checks bytes by index.
        small, add = self.small, np.add
        for key, value in chunk:
            raw = _raw_pixels(value, self.size, self.prefix)
            if raw is not None:
                add(small, raw, out=small)
                self._counted()
            else:
                pixels = _other_pixels(key, value, self.shape)
                if pixels.dtype == np.float32:
                    if self.floats is None:
                        self.floats = np.zeros(self.size, np.float32)
                    np.add(self.floats, pixels, out=self.floats)
                else:
                    add(small, pixels, out=small)
                    self._counted()

    def _counted(self) -> None:
        """One more uint8 record in the uint16 sum: fold before either sum could overflow or
        round."""
        self.in_small += 1
        if self.in_small == RECORDS_PER_UINT16_SUM:
            self.flush()
            if self.in_pixels + RECORDS_PER_UINT16_SUM > RECORDS_PER_FLOAT32_SUM:
                self.fold()

    def flush(self) -> None:
        """The uint16 sum into the float32 one (exact: integers below 2**24)."""
        if self.in_small:
            np.add(self.pixels, self.small, out=self.pixels)
            self.small[:] = 0
            self.in_pixels += self.in_small
            self.in_small = 0

    def fold(self) -> None:
        """The float32 sum into the float64 total (exact: integers below 2**53)."""
        if self.folded is None:
            self.folded = self.pixels.astype(np.float64)
        else:
            np.add(self.folded, self.pixels, out=self.folded)
        self.pixels[:] = 0
        self.in_pixels = 0

    def run(self, cursor: _SharedCursor) -> None:
        while True:
            index, chunk = cursor.take()
            if not chunk:
                self.flush()
                return
            try:
                self.add_chunk(chunk)
            except BaseException as err:  # noqa: BLE001 - re-raised by compute_image_mean
                cursor.fail(index, err)
                return
            _release(chunk)


def _release(chunk: list[tuple[memoryview, memoryview]]) -> None:
    """Passed records leave our resident set (they stay in the page cache): RSS stays flat
    instead of growing to the size of the DB. Records smaller than a page sit inline in leaf
    pages: their chunk's span is released at once (lmdb_io.release_span)."""
    if len(chunk[0][1]) < SMALL_RECORD_BYTES:
        release_span(chunk[0][1], chunk[-1][1])
    else:
        release_pages([value for _, value in chunk])


def _raw_pixels(value: memoryview | bytes, size: int, prefix: bytes) -> np.ndarray | None:
    """The pixels of a raw record of the expected shape, as a view; None for any other record.

    Caffe's raw records all start with the same bytes (channels, height, width, data length)
    and end with label (field 5) ... encoded=false (field 7): recognising them by those bytes
    skips the field walk for nearly all."""
    plen = len(prefix)
    end = plen + size  # where a raw record's pixels end and its tail starts
    n = len(value)
    if (end < n <= end + _MAX_RAW_TAIL and value[end] == _RAW_TAIL_START
            and value[n - 2] == _RAW_TAIL_END[0] and value[n - 1] == _RAW_TAIL_END[1]
            and value[:plen] == prefix):
        return np.frombuffer(value, np.uint8, size, plen)
    return None


def _other_pixels(key: memoryview | bytes, value: memoryview | bytes,
                  shape: tuple[int, ...]) -> np.ndarray:
    """A record off the raw fast path, flat: uint8 pixels (encoded records decoded natively,
    raw ones of another layout) or float32 values (float_data records). A record that is not a
    valid Datum of `shape` is an ImagenetError naming its key."""
    try:
        head = parse_datum_header(value)
        if head.has_float_data or (head.data_length == 0 and not head.encoded):
            return _decode_checked(key, bytes(value), shape)
        if head.encoded:
            return _decode_checked(key, value, shape)
        rec_shape = (head.channels, head.height, head.width)
        if head.data_length != int(np.prod(rec_shape)) or not all(rec_shape):
            decode_datum_bytes(value)  # raises what is wrong with the record itself
        if rec_shape != shape:
            raise ImagenetError(_shape_error(key, rec_shape, shape))
        return np.frombuffer(value, np.uint8, head.data_length, head.data_offset)
    except ImagenetError as err:
        if str(err).startswith("record "):
            raise
        raise ImagenetError(f"record {_key_text(key)}: {err}") from None


def _total(sums: list[_ThreadSum], count: int) -> np.ndarray:
    """float32 sum of every record: the exact pixel sums rounded once, plus the float sums.
    Reuses the first thread's buffer (fresh pages cost more than the adds here)."""
    total = sums[0].pixels
    if count * 255 < 2**24 and all(s.folded is None for s in sums):
        # Integers below 2**24 add exactly in float32: no float64 pass is needed.
        for s in sums[1:]:
            np.add(total, s.pixels, out=total)
    else:
        exact = total.astype(np.float64)
        for s in sums[1:]:
            exact += s.pixels
        for s in sums:
            if s.folded is not None:
                exact += s.folded
        total[:] = exact
    for s in sums:
        if s.floats is not None:
            np.add(total, s.floats, out=total)
    return total


class RunningSum:
    """Caffe's float32 running sum (compute_image_mean.cpp), element by element in the order
    records are added, on several threads: the elements are split into contiguous slices, one
    per thread, and each thread adds every record into its slice. Every element so sees the
    same sequence of float32 adds as in Caffe (one IEEE rounding each, uint8 converted
    exactly), whatever the thread count. cv2.accumulate does the adds (twice as fast as numpy's
    mixed-type add, and without the GIL).

    Also the pipeline's sum while converting (data/pixelsum.py), fed in key order by the one
    ordered writer."""

    def __init__(self, size: int, threads: int = 1) -> None:
        import cv2  # only here: compute-image-mean of up to 65,793 records never needs it

        self.sum = np.zeros(size, np.float32)
        self.count = 0
        self._accumulate = cv2.accumulate
        parts = max(1, min(threads, size // MIN_ELEMENTS_PER_SLICE))
        bounds = [size * i // parts for i in range(parts + 1)]
        self._slices = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        self._pool = ThreadPoolExecutor(parts, thread_name_prefix="running-sum") \
            if parts > 1 else None

    def add(self, records: list[np.ndarray]) -> None:
        """Add flat records (uint8 or float32, `size` elements each), in this order."""
        if self._pool is None:
            self._add_slice(records, slice(None))
        else:
            for _ in self._pool.map(lambda part: self._add_slice(records, part), self._slices):
                pass
        self.count += len(records)

    def _add_slice(self, records: list[np.ndarray], part: slice) -> None:
        acc, accumulate = self.sum[part], self._accumulate
        for record in records:
            accumulate(record[part], acc)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "RunningSum":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ordered_sum(txn: lmdb.Transaction, shape: tuple[int, ...], threads: int,
                 bar: Progress) -> tuple[np.ndarray, int]:
    """Caffe's float32 running sum of every record in key order (RunningSum), reading
    RECORDS_PER_ORDERED_CHUNK records at a time; records off the raw fast path (encoded ones)
    are decoded on `threads` threads first, in parallel and kept in order."""
    size, prefix = int(np.prod(shape)), raw_datum_prefix(shape)
    records = txn.cursor().iternext(keys=True, values=True)
    # Small records come many to a chunk, so that the per-chunk work (thread hand-off, page
    # release) stays a small share.
    per_chunk = max(RECORDS_PER_ORDERED_CHUNK, ORDERED_CHUNK_BYTES // max(size, 1))
    decoders = ThreadPoolExecutor(threads, thread_name_prefix="mean-decode") \
        if threads > 1 else None
    try:
        with RunningSum(size, threads) as running:
            while chunk := list(islice(records, per_chunk)):
                flat = [_raw_pixels(value, size, prefix) for _, value in chunk]
                others = [i for i, arr in enumerate(flat) if arr is None]
                if others:
                    decode = lambda i: _other_pixels(chunk[i][0], chunk[i][1], shape)  # noqa: E731
                    decoded = decoders.map(decode, others) if decoders else map(decode, others)
                    for i, arr in zip(others, decoded):
                        flat[i] = arr
                running.add(flat)
                bar.update(len(chunk))
                _release(chunk)
            return running.sum, running.count
    finally:
        if decoders is not None:
            decoders.shutdown()


def _channel_means(mean: np.ndarray) -> list[float]:
    # compute_image_mean.cpp sums each channel of the mean in float, one pixel after the other,
    # then divides by H*W in float: cumsum is that sequential float32 sum.
    dim = np.float32(mean.shape[1] * mean.shape[2])
    return [float(np.cumsum(mean[c].ravel(), dtype=np.float32)[-1] / dim)
            for c in range(mean.shape[0])]


def compute_image_mean(
    db_path: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    threads: int | None = None,
    accumulation: str = DEFAULT_ACCUMULATION,
    show_progress: bool | None = None,
) -> MeanResult:
    """Mean image of an LMDB of Datums; written to `output_file` (atomically) when given.

    `accumulation` (ACCUMULATIONS): "caffe" gives Caffe's compute_image_mean bytes at any
    record count; "exact" the exact mean rounded once."""
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
        try:
            shape = decode_datum_bytes(first[1])[0].shape
        except ImagenetError as err:
            raise ImagenetError(f"{db_path}: record {_key_text(first[0])}: {err}") from None
        floats_first = parse_datum_header(first[1]).has_float_data
        # Caffe's float32 running sum equals the exact integer sum while no add rounds: up to
        # CAFFE_EXACT_RECORDS uint8 records. Past that (or with float records, whose sums round
        # from the first add) only Caffe's order gives Caffe's bits.
        ordered = accumulation == "caffe" and (total > CAFFE_EXACT_RECORDS or floats_first)
        # The read transaction spans the whole sum: the views handed to the threads point
        # into the map and stay valid only while it is open.
        with reader.errors(), Progress(total, desc="compute_image_mean", unit="rec",
                                       enabled=show_progress, on_update=progress) as bar:
            if not ordered:
                with reader.env.begin(buffers=True) as txn:
                    total_sum, count, floats = _exact_sum(txn, db_path, shape, total, bar,
                                                          1 if floats_first else threads)
                # A float_data record among uint8 ones was summed apart from them: Caffe's
                # interleaved order is only had by summing again, in order.
                # (Rare: no Caffe tool writes float_data; a quick, silent second pass.)
                if accumulation == "caffe" and floats:
                    with reader.env.begin(buffers=True) as txn:
                        total_sum, count = _ordered_sum(txn, shape, threads,
                                                        Progress(total, enabled=False))
            else:
                with reader.env.begin(buffers=True) as txn:
                    total_sum, count = _ordered_sum(txn, shape, threads, bar)
            if count != total:  # the walk ended early: a damaged branch page
                raise ImagenetError(f"{db_path}: the LMDB says it holds {total:,} records, but "
                                    f"only {count:,} could be read: its B-tree is corrupt; "
                                    "rebuild it (imagenet convert-imageset)")
    # compute_image_mean.cpp: sum_blob.data(i) / count, in float.
    mean = np.divide(total_sum, np.float32(count), out=total_sum).reshape(shape)
    out = None
    if output_file is not None:
        out = Path(output_file)
        write_blobproto(out, mean, legacy_4d=True)
    return MeanResult(mean, _channel_means(mean), count, out, time.monotonic() - started)


def _exact_sum(txn: lmdb.Transaction, db_path: str | os.PathLike, shape: tuple[int, ...],
               expected: int, bar: Progress, threads: int) -> tuple[np.ndarray, int, bool]:
    """The exact sums of every record on `threads` threads (_ThreadSum), rounded once to
    float32: (sum, records read, whether any float_data record was met)."""
    sums = [_ThreadSum(shape) for _ in range(threads)]
    cursor = _SharedCursor(txn, bar, expected, threads)
    if threads == 1:
        sums[0].run(cursor)
    else:
        workers = [threading.Thread(target=s.run, args=(cursor,), daemon=True,
                                    name=f"compute_image_mean-{i}")
                   for i, s in enumerate(sums)]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                worker.join()
        except BaseException as err:  # Ctrl-C: stop handing out chunks, then wait
            cursor.fail(-1, err)
            for worker in workers:
                worker.join()
            raise
    error = cursor.first_error()
    if isinstance(error, ImagenetError):
        raise ImagenetError(f"{db_path}: {error}") from None
    if error is not None:
        raise error
    floats = any(s.floats is not None for s in sums)
    return _total(sums, cursor.count), cursor.count, floats


def mean_from_sum(saved: SavedSum, output_file: str | os.PathLike | None = None) -> MeanResult:
    """The mean of records whose Caffe sum a conversion kept (data/pixelsum.py): the same
    file compute_image_mean writes for their LMDB (default accumulation), without reading it."""
    # Imported here: compute-image-mean reads the LMDB and never needs it (nor its OpenCV).
    from data.pixelsum import mean_of

    started = time.monotonic()
    mean = mean_of(saved.total, saved.count)
    out = None
    if output_file is not None:
        out = Path(output_file)
        write_blobproto(out, mean, legacy_4d=True)
    return MeanResult(mean, _channel_means(mean), saved.count, out, time.monotonic() - started)
