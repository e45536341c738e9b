"""compute_image_mean: the per-pixel mean over every Datum in an LMDB, as Caffe computes it.

Reproduces tools/compute_image_mean.cpp: sum every record (encoded ones decoded natively,
float_data ones as floats), divide by the count, write a BlobProto with the legacy fields
num=1, channels, height, width and float data (C x H x W, BGR), log the per-channel means.

Caffe adds each uint8 record into a float32 sum, one record after the other. Two ways to sum
(ACCUMULATIONS):
- "exact" (default): exact integer sums on several threads. Each thread takes chunks of
  records from one shared cursor (views into the map, no copy) and adds them into its own
  uint16 sum (numpy's uint8 -> uint16 add runs as fast as cv2.accumulate's uint8 -> float32,
  and needs no OpenCV import: 45-70 ms of a process that sums 1000 records in ~30 ms), folded
  every RECORDS_PER_UINT16_SUM records into a float32 sum (exact below 2**24, so folded into
  float64 every RECORDS_PER_FLOAT32_SUM records); then float32(sum) / float32(N) like Caffe. Bit for bit Caffe's result while
  Caffe's float32 running sums are exact, i.e. N * 255 < 2**24 (N <= 65,793 records); beyond
  that Caffe's sum starts rounding and this one stays exact. float_data records (no Caffe tool
  writes them) are summed in float32: on one thread, in key order, when the first record is
  one; in a DB that mixes them with uint8 records, per thread.
- "caffe": Caffe's own float32 running sum in key order, single-threaded: Caffe's file bit for
  bit at any N (ImageNet's 1.28 M records included), rounding and all.
"""
from __future__ import annotations

import os
import threading
import time
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import lmdb
import numpy as np

from data.host import available_cores
from data.datum import decode_datum_bytes, parse_datum_header, raw_datum_prefix, write_blobproto
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader, release_pages
from data.progress import Progress

if TYPE_CHECKING:
    from data.pixelsum import SavedSum

ACCUMULATIONS = {
    "exact": "exact integer sums on threads; equals Caffe's float32 sums up to 65,793 records",
    "caffe": "Caffe's float32 running sum in key order: Caffe's bits at any size, one thread",
}
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
    """One thread's sums. With `exact`, uint8 pixels go to a uint16 sum folded into a float32
    one before it could overflow (RECORDS_PER_UINT16_SUM), which is folded into a float64 total
    before it could round (RECORDS_PER_FLOAT32_SUM), and float_data records go to a float32 sum
    of their own; without (Caffe's way), everything goes to the one float32 running sum in the
    order the records come."""

    def __init__(self, shape: tuple[int, ...], exact: bool) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.prefix = raw_datum_prefix(shape)
        self.exact = exact
        self.pixels = np.zeros(self.size, np.float32)
        self.in_pixels = 0
        self.small = np.zeros(self.size, np.uint16) if exact else None
        self.in_small = 0
        self.folded: np.ndarray | None = None  # float64, from the first fold on
        self.floats: np.ndarray | None = None if exact else self.pixels  # float_data records

    def add_chunk(self, chunk: list[tuple[memoryview, memoryview]]) -> None:
        size, prefix, plen = self.size, self.prefix, len(self.prefix)
        end = plen + size  # where a raw record's pixels end and its tail starts
        # Both adds run in C without the GIL, each element one integer add (exact) or one IEEE
        # float32 add as in Caffe (cv2.accumulate, twice as fast as numpy's mixed-type add and
        # imported only for Caffe's way). The Python around them holds the GIL and costs a
        # sixth as much, so the fast path checks bytes by index and passes 1-D views.
        if self.exact:
            small, add = self.small, np.add
        else:
            import cv2

            pixels, accumulate = self.pixels, cv2.accumulate
        for key, value in chunk:
            # Caffe's raw records all start with the same bytes (channels, height, width, data
            # length) and end with label (field 5) ... encoded=false (field 7): recognising
            # them by those bytes skips the field walk for nearly all.
            n = len(value)
            if (end < n <= end + _MAX_RAW_TAIL and value[end] == _RAW_TAIL_START
                    and value[n - 2] == _RAW_TAIL_END[0] and value[n - 1] == _RAW_TAIL_END[1]
                    and value[:plen] == prefix):
                if self.exact:
                    add(small, np.frombuffer(value, np.uint8, size, plen), out=small)
                    self._counted()
                else:
                    accumulate(np.frombuffer(value, np.uint8, size, plen), pixels)
            else:
                self.add_other(key, value)

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

    def add_other(self, key: memoryview, value: memoryview) -> None:
        """A record off the raw fast path: encoded, float_data, or with another layout; a
        record that is not a valid Datum is an error naming its key."""
        try:
            self._add_other(key, value)
        except ImagenetError as err:
            if str(err).startswith("record "):
                raise
            raise ImagenetError(f"record {_key_text(key)}: {err}") from None

    def _add_other(self, key: memoryview, value: memoryview) -> None:
        head = parse_datum_header(value)
        if head.has_float_data or (head.data_length == 0 and not head.encoded):
            if self.floats is None:
                self.floats = np.zeros(self.size, np.float32)
            np.add(self.floats, _decode_checked(key, bytes(value), self.shape), out=self.floats)
            return
        if head.encoded:
            arr = _decode_checked(key, value, self.shape)
        else:
            rec_shape = (head.channels, head.height, head.width)
            if rec_shape != self.shape or head.data_length != self.size:
                raise ImagenetError(_shape_error(key, rec_shape, self.shape))
            arr = np.frombuffer(value, np.uint8, self.size, head.data_offset)
        if self.exact:
            np.add(self.small, arr.reshape(-1), out=self.small)
            self._counted()
        else:
            import cv2

            cv2.accumulate(arr.reshape(-1), self.pixels)

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
                if self.exact:
                    self.flush()
                return
            try:
                self.add_chunk(chunk)
            except BaseException as err:  # noqa: BLE001 - re-raised by compute_image_mean
                cursor.fail(index, err)
                return
            # Passed records leave our resident set (they stay in the page cache): RSS stays
            # flat instead of growing to the size of the DB (lmdb_io.release_pages).
            release_pages([value for _, value in chunk])


def _total(sums: list[_ThreadSum], count: int) -> np.ndarray:
    """float32 sum of every record: the exact pixel sums rounded once, plus the float sums.
    Reuses the first thread's buffer (fresh pages cost more than the adds here)."""
    total = sums[0].pixels
    if not sums[0].exact:
        return total
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
        try:
            shape = decode_datum_bytes(first[1])[0].shape
        except ImagenetError as err:
            raise ImagenetError(f"{db_path}: record {_key_text(first[0])}: {err}") from None
        if accumulation == "caffe" or parse_datum_header(first[1]).has_float_data:
            # Caffe's order is key order: one thread. So is a DB of float_data records, whose
            # float32 sums would otherwise depend on which thread took which chunk.
            threads = 1
        sums = [_ThreadSum(shape, exact=accumulation == "exact") for _ in range(threads)]
        # The read transaction spans the whole sum: the views handed to the threads point
        # into the map and stay valid only while it is open.
        with reader.errors(), reader.env.begin(buffers=True) as txn, \
                Progress(total, desc="compute_image_mean", unit="rec", enabled=show_progress,
                         on_update=progress) as bar:
            cursor = _SharedCursor(txn, bar, total, threads)
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
            count = cursor.count
            if count != total:  # the walk ended early: a damaged branch page
                raise ImagenetError(f"{db_path}: the LMDB says it holds {total:,} records, but "
                                    f"only {count:,} could be read: its B-tree is corrupt; "
                                    "rebuild it (imagenet convert-imageset)")
            total_sum = _total(sums, count)
    # compute_image_mean.cpp: sum_blob.data(i) / count, in float.
    mean = np.divide(total_sum, np.float32(count), out=total_sum).reshape(shape)
    out = None
    if output_file is not None:
        out = Path(output_file)
        write_blobproto(out, mean, legacy_4d=True)
    return MeanResult(mean, _channel_means(mean), count, out, time.monotonic() - started)


def mean_from_sum(saved: SavedSum, output_file: str | os.PathLike | None = None) -> MeanResult:
    """The mean of records whose exact sum a conversion kept (data/pixelsum.py): the same
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
