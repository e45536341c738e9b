"""convert_imageset: a folder of images + a listing file -> an LMDB of Caffe Datums.

Reproduces tools/convert_imageset.cpp (and ReadImageToDatum in src/caffe/util/io.cpp):
- listing lines `<relative path> <int label>` split at the LAST space; optional shuffle;
- key `%08d_<path>` with the 0-based line index after the shuffle, so a skipped image leaves
  a gap in the keys;
- value: a raw Datum (BGR, C x H x W, uint8) or, with --encoded / --encode_type, the original
  file bytes when no resize is asked and the extension matches, else cv::imencode of the
  decoded (and resized) image;
- records committed every 1000, unreadable images logged and skipped.

Where we differ on purpose: the shuffle is reproducible (--seed; the seed used is reported);
images are decoded in parallel (the DB is byte for byte the same for any number of workers,
because one writer puts the records in line order); a truncated JPEG is counted and warned
about; a decompression bomb is refused from its header; --max-skipped turns too many skips into
a failure; a failed or interrupted build never leaves a finished-looking DB (LmdbWriter); the
free space the DB will take is checked before the first image is read.

At ImageNet's size (1.28 M records, ~257 GB) the one ordered writer is what limits many cores,
so it does as little as possible: the workers also hash each record for the content digest;
LmdbWriter commits on a thread of its own; and with pixel_sum=True (raw records of one size)
each record put is handed, in key order, to a thread that adds it into Caffe's float32 running
sum (data/pixelsum.py), from which the mean is had without reading the DB again.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import random
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from multiprocessing.pool import Pool, ThreadPool
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from data import images
from data.datum import encode_datum_bytes, encoded_datum_bytes
from data.download import check_free_space
from data.errors import ImagenetError, check_path_text, from_os_error
from data.host import available_cores, exit_with
from data.lmdb_io import COMMIT_EVERY_DEFAULT, MAX_KEY_BYTES, LmdbWriter, value_hash
from data.pixelsum import PixelSums
from data.progress import Progress
from data.textlines import caffe_lines, read_text

log = logging.getLogger(__name__)

# Images handed to a worker at a time: large enough to amortise the hand-off, small enough
# that the ordered writer never waits long for the slowest chunk.
CHUNK_SIZE = 16
# Chunks in flight per worker: bounds memory (results wait for the in-order writer) while
# keeping every worker busy.
CHUNKS_IN_FLIGHT_PER_WORKER = 4
# Caffe's key: caffe::format_int(line_id, 8) + "_" + path.
KEY_DIGITS = 8
# Bits of OS randomness for the seed of an unseeded --shuffle (reported, so it can be replayed).
_SEED_BITS = 63
# Datum.label is an int32 (caffe.proto). Caffe's atoi() wraps a larger label silently
# (99999999999 is stored as 1215752191); we refuse it.
LABEL_MIN, LABEL_MAX = -(2**31), 2**31 - 1
_BOM = "\ufeff"
# The free-space estimate (estimate_db_bytes): LMDB stores a record larger than a page on
# overflow pages of its own (4 KiB each), plus a leaf-node entry of the key and a page number;
# files sampled to guess the size of records that are not raw resized pixels; and headroom for
# branch pages, the meta pages and the map's doubling.
LMDB_PAGE = 4096
LEAF_ENTRY_OVERHEAD = 64
SIZE_SAMPLE = 32
HEADER_BYTES = 1 << 16  # enough to pass a JPEG's EXIF block to its size (SOF) marker
FREE_SPACE_HEADROOM = 1.05


@dataclass(frozen=True)
class ListingEntry:
    line_no: int  # 1-based line in the listing file, for messages
    path: str
    label: int


@dataclass(frozen=True)
class ConvertOptions:
    """What each worker needs to turn one listing entry into one record."""

    root_folder: str
    resize_height: int = 0
    resize_width: int = 0
    gray: bool = False
    encode_type: str = ""  # "" = raw records, unless `encoded` guesses it from the file name
    encoded: bool = False
    max_pixels: int = images.MAX_PIXELS_DEFAULT
    hash_values: bool = True  # value_hash each record for the writer's content digest
    resize_mode: str = images.SQUASH  # images.RESIZE_MODES; squash is Caffe's


@dataclass
class ConvertResult:
    db_path: Path
    count: int  # records written
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (line_no, path, reason)
    truncated: list[tuple[int, str]] = field(default_factory=list)  # (line_no, path)
    total_lines: int = 0
    digest: str = ""
    seconds: float = 0.0
    seed: int | None = None  # the shuffle seed actually used (None: no shuffle)
    # Caffe's float32 running sum of every record written, in key order (C x H x W), with
    # pixel_sum=True when every record was summed (raw records of one size); else None.
    pixel_sum: "np.ndarray | None" = None

    def summary(self) -> str:
        """One closing line, like Caffe's "Processed N files." plus what went wrong."""
        text = f"Processed {self.count} files."
        if self.skipped or self.truncated:
            text += (f" Skipped {len(self.skipped)} unreadable, wrote {len(self.truncated)} "
                     f"truncated (missing rows gray), of {self.total_lines} listed.")
        return text


@dataclass
class _Outcome:
    index: int  # line index after the shuffle (the number in the key)
    key: bytes
    value: bytes | None  # None = skipped
    reason: str = ""
    truncated: bool = False
    data_size: int = -1  # raw records: len(Datum.data), for --check_size
    hashed: bytes | None = None  # lmdb_io.value_hash(value), when the options ask for it


def read_listing(listfile: str | os.PathLike) -> list[ListingEntry]:
    """Parse Caffe's listing: each line `<path> <label>`, split at its last space."""
    check_path_text(listfile, "listing file")
    listfile = Path(listfile)
    try:
        text = read_text(listfile, errors="surrogateescape")
    except FileNotFoundError:
        raise ImagenetError(f"{listfile}: listing file not found") from None
    except OSError as err:
        raise from_os_error(err, "cannot read listing file") from None
    # A byte-order mark (Windows editors) would become part of the first path, invisibly:
    # Caffe then skips that image; no file name starts with one, so it is dropped.
    lines = caffe_lines(text.removeprefix(_BOM))  # at '\n' only, like Caffe
    while lines and not lines[-1].strip():
        lines.pop()  # blank lines at the end are no entries (a blank line inside is an error)
    entries = []
    for line_no, line in enumerate(lines, start=1):
        path, sep, label_text = line.rpartition(" ")
        if not sep or not path:
            raise ImagenetError(
                f"{listfile}:{line_no}: expected '<path> <label>' (split at the last space), "
                f"got {line!r}")
        try:
            label = int(label_text)
        except ValueError:
            raise ImagenetError(
                f"{listfile}:{line_no}: label {label_text!r} is not an integer in {line!r}"
            ) from None
        if not LABEL_MIN <= label <= LABEL_MAX:
            raise ImagenetError(
                f"{listfile}:{line_no}: label {label} does not fit Datum's int32 label "
                f"[{LABEL_MIN}, {LABEL_MAX}] (Caffe would store it wrapped); fix the label")
        if "\0" in path:
            raise ImagenetError(f"{listfile}:{line_no}: the path {path!r} contains a NUL byte, "
                                "which no file name can hold; fix the line")
        entries.append(ListingEntry(line_no, path, label))
    return entries


def check_options(resize_height: int, resize_width: int, encode_type: str,
                  max_pixels: int = images.MAX_PIXELS_DEFAULT,
                  resize_mode: str = images.SQUASH) -> None:
    """Refuse flag values that would fail on every image (or exhaust memory) before any work:
    sizes, an encoding OpenCV cannot write, an unknown resize mode."""
    if resize_mode not in images.RESIZE_MODES:
        raise ImagenetError(f"--resize_mode={resize_mode!r}: valid modes are "
                            f"{', '.join(images.RESIZE_MODES)}")
    if resize_height < 0 or resize_width < 0:
        raise ImagenetError(f"--resize_height and --resize_width must be >= 0, got "
                            f"{resize_height} and {resize_width}")
    if (resize_height > 0) != (resize_width > 0):
        # Caffe resizes only when both are set and silently ignores one alone.
        raise ImagenetError(f"--resize_height={resize_height} --resize_width={resize_width}: "
                            "give both sizes to resize, or neither to keep each image's size")
    if resize_height * resize_width > max_pixels:
        raise ImagenetError(f"--resize_height={resize_height} --resize_width={resize_width} "
                            f"asks for {resize_height * resize_width:,} pixels per image, over "
                            f"the limit of {max_pixels:,}; choose smaller sizes")
    if encode_type and not cv2.haveImageWriter("x." + encode_type):
        raise ImagenetError(f"--encode_type={encode_type!r}: OpenCV has no encoder for it; use "
                            f"an image extension such as {', '.join(images.COMMON_ENCODINGS)}")


def _check_keys(entries: list[ListingEntry], listfile: str | os.PathLike) -> None:
    """LMDB keys hold at most MAX_KEY_BYTES: a longer listing path would fail mid-build."""
    room = MAX_KEY_BYTES - KEY_DIGITS - 1
    for entry in entries:
        if len(entry.path.encode("utf-8", "surrogateescape")) > room:
            raise ImagenetError(f"{listfile}:{entry.line_no}: path is longer than the {room} "
                                f"bytes an LMDB key leaves for it ({entry.path[:60]!r}...); "
                                "shorten it")


def resolve_listed(root_folder: str, rel: str) -> str:
    """The file of a listing line: Caffe's root_folder + path (ImageData reads listings too)."""
    # Caffe concatenates root_folder + path; the separator is added when the root lacks one
    # (Caffe would then fail on every image).
    if not root_folder or root_folder.endswith("/"):
        return root_folder + rel
    return root_folder + "/" + rel


def _encoding_for(opts: ConvertOptions, rel: str) -> str:
    """convert_imageset.cpp: with --encoded and no --encode_type, guess it from the extension."""
    if opts.encode_type:
        return opts.encode_type
    if opts.encoded:
        dot = rel.rfind(".")
        if dot < 0:
            raise images.ImageSkip("--encoded without --encode_type guesses the format from "
                                   "the file extension, and this name has none")
        return rel[dot + 1:].lower()
    return ""


def convert_one(opts: ConvertOptions, index: int, entry: ListingEntry) -> _Outcome:
    """One listing entry -> one record, exactly as Caffe's ReadImageToDatum builds it (and its
    digest hash, which this thread has time for while the writer has not)."""
    outcome = _build(opts, index, entry)
    if outcome.value is not None and opts.hash_values:
        outcome.hashed = value_hash(outcome.value)
    return outcome


def _build(opts: ConvertOptions, index: int, entry: ListingEntry) -> _Outcome:
    key = f"{index:0{KEY_DIGITS}d}_{entry.path}".encode("utf-8", "surrogateescape")
    try:
        img = images.load_image(
            resolve_listed(opts.root_folder, entry.path), gray=opts.gray,
            resize_height=opts.resize_height, resize_width=opts.resize_width,
            max_pixels=opts.max_pixels, resize_mode=opts.resize_mode)
        encoding = _encoding_for(opts, entry.path)
        if encoding:
            resized = opts.resize_height > 0 and opts.resize_width > 0
            # io.cpp: keep the file's own bytes when the decoded colour mode is the one asked
            # for, nothing was resized, and the extension already is the encoding.
            channels = 1 if img.pixels.ndim == 2 else img.pixels.shape[2]
            if ((channels == 3) == (not opts.gray) and not resized
                    and images.extension_matches(entry.path, encoding)):
                value = encoded_datum_bytes(img.file_bytes, entry.label)
            else:
                value = encoded_datum_bytes(images.encode_image(img.pixels, encoding),
                                            entry.label)
            return _Outcome(index, key, value, truncated=img.truncated)
        chw = images.to_chw(img.pixels)
        return _Outcome(index, key, encode_datum_bytes(chw, entry.label),
                        truncated=img.truncated, data_size=chw.size)
    except images.ImageSkip as skip:
        return _Outcome(index, key, None, reason=skip.reason)


# Worker state: set once per worker by the pool initializer, so chunks carry only the listing
# entries.
_worker_opts: ConvertOptions | None = None


def _init_worker(opts: ConvertOptions, owner: int | None = None) -> None:
    global _worker_opts
    if owner is not None:  # a worker process: it ends with the process that made the pool
        exit_with(owner)
    _worker_opts = opts
    # One OpenCV thread per worker: the workers already use every core.
    cv2.setNumThreads(1)


def _convert_chunk(chunk: list[tuple[int, ListingEntry]]) -> list[_Outcome]:
    assert _worker_opts is not None, "worker used before _init_worker"
    return [convert_one(_worker_opts, index, entry) for index, entry in chunk]


def _chunks(items: list[tuple[int, ListingEntry]], size: int
            ) -> Iterator[list[tuple[int, ListingEntry]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _ordered_parallel(pool: Pool, chunks: Iterable[list], in_flight: int
                      ) -> Iterator[_Outcome]:
    """pool.imap, but with at most `in_flight` chunks outstanding (imap would queue results
    without bound when the writer is the slower side)."""
    pending: collections.deque = collections.deque()
    chunks = iter(chunks)
    for chunk in chunks:
        pending.append(pool.apply_async(_convert_chunk, (chunk,)))
        if len(pending) >= in_flight:
            break
    while pending:
        outcomes = pending.popleft().get()
        nxt = next(chunks, None)
        if nxt is not None:
            pending.append(pool.apply_async(_convert_chunk, (nxt,)))
        yield from outcomes


def _process_pool(workers: int, opts: ConvertOptions) -> Pool:
    # forkserver, not fork: forking a process whose OpenCV thread pool is running (any earlier
    # cv2.resize) can leave the child waiting forever on a lock copied while held. The server
    # preloads this module, not the caller's __main__ (the default, which re-imports whatever
    # script or `python -m` module started us), so workers start with OpenCV already loaded.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context.Pool(workers, initializer=_init_worker, initargs=(opts, os.getpid()))


def _thread_pool(workers: int, opts: ConvertOptions) -> Pool:
    _init_worker(opts)  # also limits OpenCV to one thread in this process, until restored
    return ThreadPool(workers)


# How workers run: threads of this process (the default: OpenCV, numpy, hashlib and LMDB
# release the GIL, so decoding scales with no start-up cost and no copies between processes),
# or separate processes (start-up and pickling cost more; for pipelines where Python-level
# work per image would make the GIL the limit).
POOLS: dict[str, Callable[[int, ConvertOptions], Pool]] = {
    "process": _process_pool, "thread": _thread_pool}


def _outcomes(opts: ConvertOptions, items: list[tuple[int, ListingEntry]], workers: int,
              pool_kind: str) -> Iterator[_Outcome]:
    if workers <= 1:
        for index, entry in items:
            yield convert_one(opts, index, entry)
        return
    cv_threads = cv2.getNumThreads()
    pool = POOLS[pool_kind](workers, opts)
    try:
        yield from _ordered_parallel(pool, _chunks(items, CHUNK_SIZE),
                                     workers * CHUNKS_IN_FLIGHT_PER_WORKER)
    finally:
        pool.terminate()
        pool.join()
        cv2.setNumThreads(cv_threads)
        _clear_worker()


def _clear_worker() -> None:
    global _worker_opts
    _worker_opts = None


def convert_imageset(
    root_folder: str | os.PathLike,
    listfile: str | os.PathLike,
    db_path: str | os.PathLike,
    *,
    resize_height: int = 0,
    resize_width: int = 0,
    resize_mode: str = images.SQUASH,
    shuffle: bool = False,
    seed: int | None = None,
    gray: bool = False,
    encoded: bool = False,
    encode_type: str = "",
    check_size: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    max_skipped: int | None = None,
    max_pixels: int = images.MAX_PIXELS_DEFAULT,
    commit_every: int = COMMIT_EVERY_DEFAULT,
    pool: str = "thread",
    progress: Callable[[int, int | None], None] | None = None,
    show_progress: bool | None = None,
    digest: bool = True,
    pixel_sum: bool = False,
    check_space: bool = True,
) -> ConvertResult:
    """Convert the images named in `listfile` (relative to `root_folder`) into a new LMDB.

    `resize_mode` (images.RESIZE_MODES) says how images reach resize_height x resize_width:
    squash (Caffe's, the default), crop, fill or half_crop (NVIDIA DIGITS's modes).
    `digest` fills ConvertResult.digest (lmdb_content_digest, hashed while writing); the
    command line turns it off, as it does not print it. `pool` picks how workers run (POOLS).
    `pixel_sum` fills ConvertResult.pixel_sum where it can (raw records resized to one size). `check_space` refuses to start when the filesystem of `db_path`
    lacks the estimated size of the DB (estimate_db_bytes).

    Raises ImagenetError (and leaves nothing at `db_path`) on a malformed listing, an existing
    DB without overwrite, a size mismatch under check_size, or more than max_skipped skips.
    """
    started = time.monotonic()
    check_options(resize_height, resize_width, encode_type, max_pixels, resize_mode)
    if max_skipped is not None and max_skipped < 0:
        raise ImagenetError(f"max_skipped must be >= 0, got {max_skipped}")
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ImagenetError(f"workers must be >= 1, got {workers}")
    if pool not in POOLS:
        raise ImagenetError(f"unknown worker pool {pool!r}; valid: {sorted(POOLS)}")
    root = os.fspath(root_folder)
    check_path_text(root, "root folder")
    check_path_text(db_path, "DB_NAME")
    if not Path(root).is_dir():
        raise ImagenetError(f"{root}: root folder is not a directory")
    entries = read_listing(listfile)
    if not entries:
        raise ImagenetError(f"{listfile}: the listing has no lines, so there is nothing to "
                            f"convert; no DB written at {db_path}")
    _check_keys(entries, listfile)
    used_seed = None
    if shuffle:
        # Caffe seeds from /dev/urandom; we do too when no seed is given, but report it.
        used_seed = seed if seed is not None else random.SystemRandom().getrandbits(_SEED_BITS)
        random.Random(used_seed).shuffle(entries)
    opts = ConvertOptions(root, resize_height, resize_width, gray, encode_type,
                          encoded or bool(encode_type), max_pixels, hash_values=digest,
                          resize_mode=resize_mode)
    result = ConvertResult(Path(db_path), 0, total_lines=len(entries), seed=used_seed)
    items = list(enumerate(entries))
    expected_size = -1
    if check_space:
        parent = Path(db_path).parent
        if parent.is_dir():  # else LmdbWriter says the parent is missing
            needed = estimate_db_bytes(opts, entries)
            check_free_space(parent, needed,
                             f"converting {len(entries):,} images of {listfile} into {db_path} "
                             f"(estimated {needed / 2**30:,.1f} GiB; free some space or choose "
                             "another place for the DB)")
    sums = None
    summed = 0
    with ExitStack() as stack:
        if pixel_sum and resize_height > 0 and resize_width > 0 and not opts.encoded:
            sums = stack.enter_context(PixelSums((1 if gray else 3, resize_height,
                                                  resize_width)))
        writer = stack.enter_context(
            LmdbWriter(db_path, overwrite=overwrite, commit_every=commit_every, digest=digest))
        bar = stack.enter_context(Progress(len(entries), desc="convert_imageset", unit="img",
                                           enabled=show_progress, on_update=progress))
        outcomes = stack.enter_context(closing(_outcomes(opts, items, workers, pool)))
        for outcome in outcomes:
            entry = entries[outcome.index]
            bar.update()
            if outcome.value is None:
                result.skipped.append((entry.line_no, entry.path, outcome.reason))
                bar.clear_line()  # else the warning is glued to the bar's line
                log.warning("skipped %s (listing line %d): %s",
                            resolve_listed(root, entry.path), entry.line_no, outcome.reason)
                if max_skipped is not None and len(result.skipped) > max_skipped:
                    raise ImagenetError(
                        f"more than --max-skipped={max_skipped} images could not be converted "
                        f"(last: {entry.path} at {listfile}:{entry.line_no}: {outcome.reason}); "
                        f"no DB written at {db_path}")
                continue
            if outcome.truncated:
                result.truncated.append((entry.line_no, entry.path))
                bar.clear_line()  # else the warning is glued to the bar's line
                log.warning("truncated JPEG %s (listing line %d): written with the missing rows "
                            "gray (128), as Caffe does", resolve_listed(root, entry.path),
                            entry.line_no)
            if check_size and outcome.data_size >= 0:
                if expected_size < 0:
                    expected_size = outcome.data_size
                elif outcome.data_size != expected_size:
                    # convert_imageset.cpp: CHECK_EQ(data.size(), data_size).
                    raise ImagenetError(
                        f"--check_size: {entry.path} ({listfile}:{entry.line_no}) gives "
                        f"{outcome.data_size} bytes of pixels, the first image gave "
                        f"{expected_size}; no DB written at {db_path}")
            writer.put(outcome.key, outcome.value, outcome.hashed)
            if sums is not None:
                summed += sums.add(outcome.value)
        result.count = writer.puts
        if not result.count:
            # Raised inside the `with`: the writer throws the empty build away.
            line_no, path, reason = result.skipped[0]
            raise ImagenetError(
                f"none of the {len(entries)} images in {listfile} could be converted (first: "
                f"{path} at line {line_no}: {reason}); check ROOTFOLDER/ {root!r} and the "
                f"listing's paths; no DB written at {db_path}")
    result.digest = writer.content_digest() if digest else ""
    if sums is not None and summed == result.count > 0:
        result.pixel_sum = sums.total()
    result.seconds = time.monotonic() - started
    return result


def _record_bytes(payload: int, key_length: int) -> int:
    """Bytes one record takes in an LMDB: its own overflow pages when larger than a page."""
    value = payload + LEAF_ENTRY_OVERHEAD
    if value > LMDB_PAGE // 2:
        value = -(-value // LMDB_PAGE) * LMDB_PAGE
    return value + key_length + LEAF_ENTRY_OVERHEAD


def estimate_db_bytes(opts: ConvertOptions, entries: list[ListingEntry]) -> int:
    """About how many bytes the LMDB of `entries` will take: exact for raw records of a fixed
    size (C x H x W each); otherwise from SIZE_SAMPLE files spread over the listing (their
    byte sizes for encoded records, their pixel counts from the image headers for raw ones)."""
    if not entries:
        return 0
    key_length = KEY_DIGITS + 1 + max(len(e.path) for e in entries)
    channels = 1 if opts.gray else 3
    if not opts.encoded and opts.resize_height > 0 and opts.resize_width > 0:
        per_record = channels * opts.resize_height * opts.resize_width
    else:
        step = max(1, len(entries) // SIZE_SAMPLE)
        sizes = []
        for entry in entries[::step][:SIZE_SAMPLE]:
            path = resolve_listed(opts.root_folder, entry.path)
            try:
                if opts.encoded:
                    sizes.append(os.path.getsize(path))
                else:
                    with open(path, "rb") as f:
                        header = images.read_header(f.read(HEADER_BYTES))
                    if header is not None:
                        sizes.append(channels * header.width * header.height)
            except OSError:
                continue  # unreadable files are skipped by the conversion, not counted here
        if not sizes:
            return 0
        per_record = int(sum(sizes) / len(sizes))
    return int(len(entries) * _record_bytes(per_record, key_length) * FREE_SPACE_HEADROOM)
