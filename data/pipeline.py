"""The Data layer's input pipeline: LMDB records -> uint8 batches, prefetched in the background.

`BatchSource` is what every fed input layer's source shares (batch assembly, the counter-based
RNG); `DataSource` reads LMDBs here, `ImageDataSource` (data/image_data.py) image listings, and
`open_source` picks one by layer type (`SOURCE_TYPES`).

Reproduces what Caffe's DataLayer + DataReader feed a net (src/caffe/layers/data_layer.cpp):
records are read in key order, `batch_size` at a time, wrapping around to the first record at
the end ("Restarting data prefetching from start."); encoded Datums are decoded like
DataTransformer (natively, or in colour/gray with force_color/force_gray).

Unlike Caffe, a batch is a pure function of (seed, stream, batch index): batch i holds records
(i*N .. i*N+N-1) mod len(db) and its crop offsets and mirror flags come from a counter-based
generator keyed on (seed, stream, i), so any iteration's batch can be rebuilt and a resumed run
sees exactly the data the interrupted run would have seen (Caffe restarts the reader and its
RNG on resume: BVLC/caffe#1059).

Batches stay uint8 on the host (`HostBatch`); the float transform runs on the device
(data/transform.py `transform_batch`). `Prefetcher` keeps `depth` batches in flight on
background threads so the device does not wait on LMDB reads and JPEG decodes.
"""
from __future__ import annotations

import importlib
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from data.datum import decode_datum_bytes, parse_datum_header
from data.errors import ImagenetError
from data.labels import LabelCheck, check_labels
from data.lmdb_io import LmdbReader, release_pages
from data.proto import caffe_pb2
from data.transform import TransformPlan, crop_uint8

# Batches prepared ahead of the one being consumed: two keep the device fed while the host
# decodes the third (Caffe's DataLayer keeps PREFETCH_COUNT = 4 full batches).
DEFAULT_PREFETCH = 3
# Threads decoding batches (LMDB reads and OpenCV release the GIL): by default one per core
# this process may run on (`default_workers`).
# Seed words must be non-negative for numpy's SeedSequence.
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class HostBatch:
    """One batch on the host: cropped uint8 pixels plus what the device transform needs."""

    index: int
    images: np.ndarray   # (N, C, h, w) uint8, already cropped
    offsets: np.ndarray  # (N, 2) int32 crop offsets in the source images
    mirror: np.ndarray   # (N,) bool
    labels: np.ndarray   # (N,) float32 (Caffe's label blob is Dtype)
    wrapped: bool        # this batch passed the end of the database


def _decode(value: bytes, plan: TransformPlan, where: str) -> tuple[np.ndarray, int]:
    """One Datum -> (C,H,W) uint8 and label, decoding encoded records as Caffe's transformer;
    `where` (the DB and record key) starts every error message."""
    try:
        head = parse_datum_header(value)
        if head.encoded and plan.force_gray:
            data = memoryview(value)[head.data_offset:head.data_offset + head.data_length]
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise ImagenetError("could not decode its encoded image")
            return img[np.newaxis], head.label
        chw, label = decode_datum_bytes(value, force_color=plan.force_color)
    except ImagenetError as err:
        raise ImagenetError(f"{where}: {err}") from None
    if chw.dtype != np.uint8:
        raise ImagenetError(f"{where} holds float_data; the Data pipeline feeds uint8 "
                            "pixels (Caffe's convert_imageset writes uint8)")
    return chw, label


_READERS: dict[Path, list] = {}  # resolved path -> [LmdbReader, refcount]
_READERS_LOCK = threading.Lock()


def _acquire_reader(path: Path) -> LmdbReader:
    """py-lmdb refuses to open one environment twice in a process, and train and test nets may
    read the same database: share one reader per path, reference-counted."""
    key = path.resolve()
    with _READERS_LOCK:
        entry = _READERS.get(key)
        if entry is None:
            entry = _READERS[key] = [LmdbReader(path), 0]
        entry[1] += 1
        return entry[0]


def _release_reader(path: Path) -> None:
    key = path.resolve()
    with _READERS_LOCK:
        entry = _READERS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _READERS[key]


class BatchSource:
    """What every fed input layer's source shares: the transform plan, the batch size, the
    counter-based RNG, the label check and the uint8 batch assembly. Subclasses set `name`,
    `tops`, `plan`, `batch_size`, `seed`, `stream` and implement `__len__`, `_items(index)`,
    `describe_item(index, j)` and `close`. The net's builder sets `label_checks` from the
    layers reading the label top (model/net.py Net.label_checks)."""

    name: str
    tops: tuple[str, ...]
    plan: TransformPlan
    batch_size: int
    seed: int
    stream: int
    label_checks: tuple[LabelCheck, ...] = ()
    # (this part, parts): multi-process training reads part p of P of every global batch
    part: tuple[int, int] = (0, 1)

    def read_part(self, part: int, parts: int) -> None:
        """Read only images [part*N/parts, (part+1)*N/parts) of each batch of N from now on:
        a process's share of the global batch, in the global batch's order, with the draws a
        single process would make for those images."""
        if not 0 <= part < parts or self.batch_size % parts:
            raise ImagenetError(f"layer {self.name!r}: cannot read part {part} of {parts} of a "
                                f"batch of {self.batch_size} (it must split evenly)")
        self.part = (int(part), int(parts))

    def rows(self) -> slice:
        """The positions, within each global batch, of the images this source reads."""
        part, parts = self.part
        size = self.batch_size // parts
        return slice(part * size, (part + 1) * size)

    def __len__(self) -> int:
        raise NotImplementedError

    def _items(self, index: int) -> tuple[list[np.ndarray], list[int], str]:
        """The (C,H,W) uint8 images and labels of batch `index` at positions `rows()`, and
        where they came from (for messages)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe_item(self, index: int, j: int) -> str:
        """Where item `j` (its position in the whole batch) of batch `index` came from, for
        messages (a record key, a line)."""
        return f"{self.name}: item {j} of batch {index}"

    def record_indices(self, index: int) -> np.ndarray:
        start = index * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64) % len(self)

    def rng(self, index: int) -> np.random.Generator:
        """The generator for batch `index`: counter-based (Philox), keyed on the seed, the
        stream (one per Data layer / test net) and the index, so it is a pure function."""
        return np.random.Generator(np.random.Philox(
            np.random.SeedSequence([self.seed, self.stream, int(index)])))

    def wrapped(self, index: int, offset: int = 0) -> bool:
        """Whether batch `index` passes the end of the records (Caffe logs a restart)."""
        start = offset + index * self.batch_size
        return (start // len(self)) != ((start + self.batch_size - 1) // len(self))

    def batch(self, index: int) -> HostBatch:
        """Batch number `index` (0-based) of this layer (this source's part of it)."""
        images, labels, where = self._items(index)
        first = self.rows().start  # position of this part's first image in the batch
        check_labels(labels, self.label_checks,
                     lambda j: self.describe_item(index, first + j))
        hs = [im.shape[1] for im in images]
        ws = [im.shape[2] for im in images]
        offsets, mirror = self.plan.draw(self.rng(index), hs, ws, batch=self.batch_size,
                                         first=first)
        out_hw = self.plan.output_hw(hs[0], ws[0])
        shapes = {(im.shape[0], *self.plan.output_hw(im.shape[1], im.shape[2])) for im in images}
        if len(shapes) != 1:
            raise ImagenetError(f"{where}: batch {index} mixes image shapes {sorted(shapes)}; "
                                "without crop_size every image must have the same size")
        out = np.empty((len(images), *shapes.pop()), np.uint8)
        for j, im in enumerate(images):
            out[j] = crop_uint8(im, offsets[j], out_hw)
        return HostBatch(index=index, images=out, offsets=offsets, mirror=mirror,
                         labels=np.asarray(labels, np.float32), wrapped=self.wrapped(index))

    def mean(self, channels: int) -> np.ndarray | None:
        return self.plan.mean_array(channels)

    def __enter__(self) -> "BatchSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DataSource(BatchSource):
    """A Data layer's records and transform; `batch(i)` is pure in (seed, stream, i)."""

    def __init__(self, layer_param: caffe_pb2.LayerParameter, *, train: bool, seed: int,
                 stream: int = 0, batch_multiplier: int = 1, root: str | Path = ".") -> None:
        dp = layer_param.data_param
        if dp.backend != caffe_pb2.DataParameter.LMDB:
            raise ImagenetError(f"layer {layer_param.name!r}: only backend LMDB is supported")
        if dp.batch_size < 1:
            raise ImagenetError(f"layer {layer_param.name!r}: data_param batch_size must be "
                                f">= 1, got {dp.batch_size}")
        self.name = layer_param.name
        self.path = Path(root) / dp.source
        self.reader = _acquire_reader(self.path)
        self.keys = self.reader.keys()
        if not self.keys:
            raise ImagenetError(f"layer {self.name!r}: Data source {self.path} is empty")
        self.plan = TransformPlan.from_param(layer_param.transform_param, train=train, root=root)
        # Multi-device: Caffe gives each solver batch_size records; the global batch is their
        # concatenation (batch_size x devices).
        self.batch_size = int(dp.batch_size) * int(batch_multiplier)
        self.seed = int(seed) & _SEED_MASK
        self.stream = int(stream)
        self.tops = tuple(layer_param.top)
        self._local = threading.local()
        self._closed = False

    def __len__(self) -> int:
        return len(self.keys)

    def _txn(self):
        # One read transaction per thread: LMDB transactions are not shared between threads.
        # Values come as views into the map (no copy: the crop copies what it keeps).
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self.reader.env.begin(buffers=True)
            self._local.txn = txn
        return txn

    def _items(self, index: int) -> tuple[list[np.ndarray], list[int], str]:
        images, labels, views = [], [], []
        with self.reader.errors():  # a corrupt page: one line naming the DB
            txn = self._txn()
            for i in self.record_indices(index)[self.rows()]:
                key = self.keys[int(i)]
                value = txn.get(key)
                where = self._record(key)
                if value is None:
                    raise ImagenetError(f"{where} vanished while reading")
                views.append(value)
                chw, label = _decode(value, self.plan, where)
                self.plan.check_image(chw.shape, where)
                images.append(chw)
                labels.append(label)
        self._local.views = views
        return images, labels, str(self.path)

    def batch(self, index: int) -> HostBatch:
        """Batch number `index`; then the pages of its records leave the resident set, so an
        epoch over a database larger than RAM does not grow RSS to its size (they stay in the
        page cache: lmdb_io.release_pages)."""
        try:
            return super().batch(index)
        finally:
            release_pages(getattr(self._local, "views", ()))
            self._local.views = []

    def _record(self, key: bytes) -> str:
        return f"{self.path}: record {key.decode('utf-8', 'replace')!r}"

    def describe_item(self, index: int, j: int) -> str:
        return self._record(self.keys[int(self.record_indices(index)[j])])

    def close(self) -> None:
        # Transactions of other threads die with the environment when its last user releases it.
        txn = getattr(self._local, "txn", None)
        if txn is not None:
            txn.abort()
            self._local.txn = None
        if not self._closed:
            self._closed = True
            _release_reader(self.path)


# Fed input layer type -> "module:class" of its source, imported when first used (the ImageData
# source pulls in the image decoder only for nets that read image listings).
SOURCE_TYPES: dict[str, str] = {
    "Data": "data.pipeline:DataSource",
    "ImageData": "data.image_data:ImageDataSource",
}


def open_source(layer_param: caffe_pb2.LayerParameter, *, train: bool, seed: int,
                stream: int = 0, batch_multiplier: int = 1, root: str | Path = "."
                ) -> BatchSource:
    """The source feeding a Data or ImageData layer (SOURCE_TYPES), opened."""
    try:
        target = SOURCE_TYPES[layer_param.type]
    except KeyError:
        raise ImagenetError(f"layer {layer_param.name!r}: type {layer_param.type!r} is not fed "
                            f"from data; input layers read from data: "
                            f"{', '.join(sorted(SOURCE_TYPES))}") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(layer_param, train=train, seed=seed, stream=stream,
               batch_multiplier=batch_multiplier, root=root)


def default_workers() -> int:
    """Decoding threads when none are asked for: the cores this process may run on (its CPU
    affinity: a pinned training process gets its share, not the whole host)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS)
        return max(1, os.cpu_count() or 1)


class Prefetcher:
    """Batches start, start+1, ... of a DataSource, `depth` of them built ahead on threads."""

    def __init__(self, source: BatchSource, start: int = 0, *, depth: int = DEFAULT_PREFETCH,
                 workers: int | None = None) -> None:
        if depth < 1:
            raise ImagenetError(f"prefetch depth must be >= 1, got {depth}")
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise ImagenetError(f"input workers must be >= 1, got {workers}")
        self.source = source
        self.next_index = start
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
        self._queue: deque[Future[HostBatch]] = deque()
        self._submitted = start
        self.depth = depth
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self.depth:
            self._queue.append(self._pool.submit(self.source.batch, self._submitted))
            self._submitted += 1

    def __iter__(self) -> Iterator[HostBatch]:
        return self

    def __next__(self) -> HostBatch:
        batch = self._queue.popleft().result()
        self.next_index += 1
        self._fill()
        return batch

    def close(self) -> None:
        for fut in self._queue:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.clear()
