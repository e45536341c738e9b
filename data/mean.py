"""compute_image_mean: the per-pixel mean over every Datum in an LMDB, as Caffe computes it.

Reproduces tools/compute_image_mean.cpp: sum every record (encoded ones decoded natively),
divide by the count, write a BlobProto with the legacy fields num=1, channels, height, width
and float data (C x H x W, BGR), and log the per-channel means.

Caffe sums in float32, one record after the other. We sum the uint8 pixels exactly in integers
(uint16 partial sums of at most 257 records, which cannot overflow, folded into uint64) and
then divide in float32 like Caffe: float32(sum) / float32(N). That is bit for bit Caffe's
result while every running sum is exactly representable in float32 (N * 255 < 2**24, i.e.
N <= 65,793 records); beyond that Caffe's float32 sum starts rounding and ours stays exact.
Integer sums do not depend on order, so batches of records are summed on several threads
(numpy releases the GIL) while the reader parses the next records in place (no copies).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from data.convert import available_cores
from data.datum import decode_datum_bytes, parse_datum_header, write_blobproto
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader
from data.progress import Progress

# Records per uint16 partial sum: 257 * 255 = 65,535 is the most a uint16 can hold.
RECORDS_PER_PARTIAL = 257
# Partial sums in flight per thread: keeps the threads fed without holding many 2-byte/pixel
# accumulators at once.
PARTIALS_IN_FLIGHT_PER_THREAD = 2


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


def _sum_raw(views: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    partial = np.zeros(int(np.prod(shape)), dtype=np.uint16)
    for view in views:
        np.add(partial, view, out=partial)
    return partial


def _sum_encoded(values: list[tuple[bytes, memoryview]], shape: tuple[int, ...]
                 ) -> np.ndarray:
    partial = np.zeros(shape, dtype=np.uint16)
    for key, value in values:
        arr, _ = decode_datum_bytes(value)
        if arr.shape != shape:
            raise ImagenetError(_shape_error(key, arr.shape, shape))
        np.add(partial, arr, out=partial)
    return partial.reshape(-1)


def _shape_error(key: bytes, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    return (f"record {key.decode('utf-8', 'replace')!r} has shape {list(got)} but the first "
            f"record has {list(want)}: every record must have the same shape to average "
            f"(convert with --resize_height/--resize_width)")


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
    show_progress: bool | None = None,
) -> MeanResult:
    """Mean image of an LMDB of Datums; written to `output_file` (atomically) when given."""
    started = time.monotonic()
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise ImagenetError(f"threads must be >= 1, got {threads}")
    with LmdbReader(db_path) as reader:
        total = len(reader)
        first = reader.first()
        if first is None:
            raise ImagenetError(f"{db_path}: the LMDB holds no records, there is nothing to "
                                f"average")
        first_arr, _ = decode_datum_bytes(first[1])
        shape = first_arr.shape
        size = first_arr.size
        float_records = first_arr.dtype != np.uint8
        total_sum = np.zeros(size, dtype=np.float32 if float_records else np.uint64)
        count = 0
        pending: list[Future] = []
        batch: list = []
        in_flight = threads * PARTIALS_IN_FLIGHT_PER_THREAD

        def fold(future: Future) -> None:
            np.add(total_sum, future.result(), out=total_sum)

        # The read transaction spans the whole sum: the buffers handed to the threads point
        # into the map and stay valid only while it is open.
        with reader.env.begin(buffers=True) as txn, \
                ThreadPoolExecutor(max_workers=threads) as pool, \
                Progress(total, desc="compute_image_mean", unit="rec", enabled=show_progress,
                         on_update=progress) as bar:
            batch_encoded = False

            def flush() -> None:
                if not batch:
                    return
                task = _sum_encoded if batch_encoded else _sum_raw
                pending.append(pool.submit(task, list(batch), shape))
                batch.clear()
                while len(pending) >= in_flight:
                    fold(pending.pop(0))

            try:
                for key, value in txn.cursor().iternext(keys=True, values=True):
                    head = parse_datum_header(value)
                    count += 1
                    bar.update()
                    if head.has_float_data or float_records:
                        # float_data records: summed in float32, in order, like Caffe.
                        arr, _ = decode_datum_bytes(bytes(value))
                        if arr.shape != shape or arr.dtype != np.float32:
                            raise ImagenetError(_shape_error(bytes(key), arr.shape, shape))
                        np.add(total_sum, arr.reshape(-1), out=total_sum)
                        continue
                    if head.encoded != batch_encoded:
                        flush()
                        batch_encoded = head.encoded
                    if head.encoded:
                        # Decoded and shape-checked on the worker threads.
                        batch.append((bytes(key), value))
                    else:
                        rec_shape = (head.channels, head.height, head.width)
                        if rec_shape != shape or head.data_length != size:
                            raise ImagenetError(_shape_error(bytes(key), rec_shape, shape))
                        batch.append(np.frombuffer(value, dtype=np.uint8, count=size,
                                                   offset=head.data_offset))
                    if len(batch) >= RECORDS_PER_PARTIAL:
                        flush()
                flush()
                while pending:
                    fold(pending.pop(0))
            finally:
                # Never let a thread touch the map after the transaction closes.
                for future in pending:
                    future.cancel()
                for future in pending:
                    if not future.cancelled():
                        future.exception()
    # compute_image_mean.cpp: sum_blob.data(i) / count, in float.
    mean = (total_sum.astype(np.float32) / np.float32(count)).reshape(shape)
    out = None
    if output_file is not None:
        out = Path(output_file)
        write_blobproto(out, mean, legacy_4d=True)
    return MeanResult(mean, _channel_means(mean), count, out, time.monotonic() - started)
