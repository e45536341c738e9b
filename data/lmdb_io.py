"""LMDB databases of Caffe records: an atomic, self-growing writer, a reader, a content digest.

Caffe's own wrapper (src/caffe/util/db_lmdb.cpp) buffers puts, commits them in one transaction
and doubles the map size when a commit hits MDB_MAP_FULL; convert_imageset commits every 1000
records. LmdbWriter does the same, and also builds the database in a temporary directory beside
the target, renaming it into place only when the build finishes: a killed build never leaves
a DB that looks finished (Caffe's does), and a rerun removes the leftovers of dead builds.
The directory holds `data.mdb` + `lock.mdb`, which real Caffe opens as is.
Every reader checks the database before mapping it (data/lmdb_verify.py: file size and
B-tree), so a truncated or corrupt one is an ImagenetError instead of SIGBUS.

Where we differ on purpose, for speed at ImageNet's size: the transactions are written on a
thread of their own (the caller only queues records: LMDB copies them and writes the pages with
the GIL released), and while keys come in increasing order (convert_imageset's `%08d_` keys
always do) they are put with MDB_APPEND, which skips the B-tree search and fills pages instead
of splitting them in half. The records and their order are the same either way.

Readers that walk a large DB once (the mean, the digest) call `release_pages` on the records
they have passed: the pages leave the process's resident set (madvise MADV_DONTNEED on a
read-only file mapping only drops our page-table entries; the data stays in the page cache and
comes back on the next touch), so RSS no longer grows to the size of the database.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import mmap
import os
import shutil
import struct
import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator

import numpy as np

import lmdb

from data.atomic import pid_alive
from data.errors import OS_ERROR_HINTS, ImagenetError, errno_name, from_os_error
from data.lmdb_verify import BEING_WRITTEN, DATA_FILE, REBUILD, check_data_file, last_transaction

# Initial map size of a new DB: the data file grows page by page (it is not preallocated), so
# this only bounds how soon the first doubling happens.
INITIAL_MAP_SIZE = 1 << 30
# Caffe commits every 1000 records (convert_imageset.cpp).
COMMIT_EVERY_DEFAULT = 1000
# ... and we also commit once this many bytes are pending: it bounds the memory held by
# pending records (1000 raw 256x256 records are 196 MB) and hands the disk work out in slices
# that the background flusher writes while conversion goes on. Measured (benchmarks/scale.py
# --part writer): 32 -> 64 MB raised the writer's rate; beyond it nothing changed.
COMMIT_BYTES_DEFAULT = 64 << 20
# Transactions queued for the commit thread beyond the one it is writing: one lets the caller
# fill the next batch while the last is written; more would only hold more memory.
COMMITS_IN_FLIGHT = 1
# Address space a registered reader maps: room for a database another process is still
# growing (LMDB refuses a transaction beyond the map with MDB_MAP_RESIZED); only the pages in
# use are ever touched.
READER_MAP_BYTES = 1 << 42
# Prefix of the temporary build directory; the pid after it tells whether its owner still runs.
_PARTIAL_MARK = ".partial-"
# Where an overwrite moves the previous DB for the instant between the two renames.
_OLD_MARK = ".old-"
_DATA_FILE = DATA_FILE
_LOCK_FILE = "lock.mdb"
# What an LMDB directory holds: anything else in a folder means it is not (only) a database,
# and --overwrite refuses to replace it.
_LMDB_FILES = frozenset({_DATA_FILE, _LOCK_FILE})
# LMDB's default (and, in the builds py-lmdb and Caffe use, fixed) MDB_MAXKEYSIZE.
MAX_KEY_BYTES = 511
# Framing of each record in lmdb_content_digest: key length and value length as little-endian
# uint64, so concatenations cannot collide (("ab","c") vs ("a","bc")).
_DIGEST_FRAME = struct.Struct("<QQ")
# v2: each value enters as its own sha256, so the values can be hashed in parallel (by the
# converter's workers) and only 32 bytes per record pass through the ordered running hash.
_DIGEST_VERSION = b"imagenet-pipeline lmdb digest v2\n"
# madvise(2) advice that drops a range's page-table entries (Linux and the BSDs).
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PAGE = mmap.PAGESIZE
# Records read between two release_pages calls in the single-threaded readers.
RELEASE_EVERY = 64


def _is_lmdb_dir(path: Path) -> bool:
    return path.is_dir() and (path / _DATA_FILE).is_file()


def lmdb_error_message(err: lmdb.Error, path: str | os.PathLike, action: str = "") -> str:
    """One line for an lmdb.Error on the DB at `path`: py-lmdb's own words, the errno name
    when LMDB passed one up (ENOSPC from a commit on a full disk), and what to do."""
    what = str(err.args[0]) if err.args else type(err).__name__
    # py-lmdb's C extension sets .code (the errno or MDB_* code); Error(what, code) keeps both
    # in args.
    code = getattr(err, "code", None)
    if not isinstance(code, int):
        code = err.args[1] if len(err.args) > 1 and isinstance(err.args[1], int) else None
    name = errno_name(code) if code is not None and code > 0 else ""
    text = f"{action + ' ' if action else ''}{os.fspath(path)}: {what}"
    if name and name not in text:
        text += f" ({name})"
    hint = OS_ERROR_HINTS.get(code) if code is not None else None
    if hint is None and isinstance(err, (lmdb.CorruptedError, lmdb.PageNotFoundError,
                                         lmdb.InvalidError, lmdb.VersionMismatchError)):
        hint = f"the database is corrupt or not an LMDB; {REBUILD}"
    return f"{text}; {hint}" if hint else text


@contextlib.contextmanager
def lmdb_errors(path: str | os.PathLike, action: str = "") -> Iterator[None]:
    """Turn lmdb.Error (and OSError) inside the block into an ImagenetError naming `path`."""
    try:
        yield
    except lmdb.Error as err:
        raise ImagenetError(lmdb_error_message(err, path, action)) from None
    except OSError as err:
        raise from_os_error(err, action, path if err.filename is None else None) from None


def _open_readonly(path: Path) -> tuple[lmdb.Environment, bool]:
    """(environment, registered). Like Caffe's reader (MDB_RDONLY, with the lock file), each
    read transaction is registered in lock.mdb, so a process appending to the database never
    reuses a page under it; where the lock file cannot be written (a read-only folder such as
    the Caffe goldens) the reader goes without (registered=False). The tree is checked while a
    registered read transaction holds the pages it walks still."""
    if not path.exists():
        raise ImagenetError(f"{path}: no such LMDB (the path does not exist)")
    if not _is_lmdb_dir(path):
        raise ImagenetError(
            f"{path}: not an LMDB (expected a directory holding {_DATA_FILE}, as Caffe writes)")
    lock_file = path / _LOCK_FILE
    env = None
    if lock_file.is_file() and os.access(lock_file, os.W_OK) and os.access(path, os.W_OK):
        try:
            # lmdb.open reads the header with pread (a short file fails here, not SIGBUS)
            env = lmdb.open(str(path), readonly=True, lock=True, readahead=True,
                            max_readers=2048, subdir=True, map_size=READER_MAP_BYTES)
        except lmdb.Error:
            env = None  # read-only lock file or mount, unusual builds: read as before
    if env is not None:
        try:
            with env.begin():  # pins this transaction's pages while the tree is walked
                check_data_file(path)
        except BaseException:
            env.close()
            raise
        return env, True
    check_data_file(path)
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=True,
                         max_readers=2048, subdir=True), False
    except lmdb.Error as err:
        raise ImagenetError(f"{path}: not a readable LMDB ({err})") from None


class LmdbReader:
    """Read-only access to an LMDB: len, iteration in key order, random access by key.

    Registered in the lock file like Caffe's readers where it can be (see _open_readonly), so
    a database another process appends to reads as the snapshot each transaction began at;
    without the lock file (read-only folders) a change by a writer during a read is reported
    as what it is, not as corruption.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.env, self.registered = _open_readonly(self.path)
        self.txnid = last_transaction(self.path)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """lmdb_errors for this DB: a corrupt page read inside the block is an ImagenetError
        (or, when a writer committed since the open, says the database is being written)."""
        try:
            with lmdb_errors(self.path, "reading LMDB"):
                yield
        except ImagenetError:
            now = last_transaction(self.path)
            if now is not None and self.txnid is not None and now != self.txnid:
                raise ImagenetError(f"reading LMDB {self.path}: " + BEING_WRITTEN.format(
                    old=self.txnid, new=now)) from None
            raise

    def __len__(self) -> int:
        with self.errors():
            return int(self.env.stat()["entries"])

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        with self.errors(), self.env.begin(buffers=False) as txn:
            yield from txn.cursor().iternext(keys=True, values=True)

    def iter_buffers(self) -> Iterator[tuple[memoryview, memoryview]]:
        """(key, value) as memoryviews into the map: no copy, but each pair is only valid until
        the iterator advances (copy what you keep)."""
        with self.errors(), self.env.begin(buffers=True) as txn:
            yield from txn.cursor().iternext(keys=True, values=True)

    def get(self, key: bytes) -> bytes | None:
        with self.errors(), self.env.begin() as txn:
            return txn.get(key)

    def keys(self) -> list[bytes]:
        with self.errors(), self.env.begin() as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def first(self) -> tuple[bytes, bytes] | None:
        """The first record in key order, or None for an empty DB."""
        with self.errors(), self.env.begin() as txn:
            cursor = txn.cursor()
            return (cursor.key(), cursor.value()) if cursor.first() else None

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "LmdbReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def value_hash(value: bytes | memoryview) -> bytes:
    """What a record's value contributes to the content digest (hashlib releases the GIL for
    large buffers, so threads can compute these in parallel)."""
    return hashlib.sha256(value).digest()


class RecordDigest:
    """The running hash behind lmdb_content_digest: feed it records in key order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(_DIGEST_VERSION)

    def update(self, key: bytes | memoryview, value: bytes | memoryview,
               hashed: bytes | None = None) -> None:
        """Add one record; `hashed` is value_hash(value) when the caller already has it."""
        self._hash.update(_DIGEST_FRAME.pack(len(key), len(value)))
        self._hash.update(key)
        self._hash.update(hashed if hashed is not None else value_hash(value))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _KeepFreedPages:
    """While any LmdbWriter is open, glibc keeps freed memory for reuse instead of handing it
    back to the kernel at once.

    Why: LMDB mallocs the overflow pages of every large record (196 KB for a 256x256 image)
    and frees them after each commit; glibc returns such blocks to the kernel straight away
    (its mmap and trim thresholds start at 128 KiB), so every record's pages were faulted in
    afresh: ~2 us per 4 KiB page on these VMs, half of the writer's time (benchmarks/scale.py
    writer in memory: 4,415 -> 7,062 rec/s with the thresholds raised). The last writer to
    close lowers the trim threshold and trims what was kept. Setting a threshold ends glibc's
    dynamic adjustment for the process, so they are left where that adjustment takes them
    after a 32 MiB block is freed (what a process handling large arrays reaches anyway),
    not at the 128 KiB start, which would fault large arrays in afresh every time (training
    runs in the same process). A no-op without glibc."""

    _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
    KEEP_BYTES = 512 << 20  # freed memory kept at the top of a heap before trimming
    MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heaps (glibc's maximum)
    TRIM_AFTER = 2 * MMAP_THRESHOLD  # glibc's dynamic trim threshold at that mmap threshold

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        try:
            libc = ctypes.CDLL(None)
            self._mallopt, self._trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            self._mallopt = self._trim = None

    def acquire(self) -> None:
        with self._lock:
            self._open += 1
            if self._open == 1 and self._mallopt is not None:
                self._mallopt(self._M_MMAP_THRESHOLD, self.MMAP_THRESHOLD)
                self._mallopt(self._M_TRIM_THRESHOLD, self.KEEP_BYTES)

    def release(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0 and self._mallopt is not None:
                self._mallopt(self._M_TRIM_THRESHOLD, self.TRIM_AFTER)
                self._trim(0)


_keep_freed_pages = _KeepFreedPages()


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def release_pages(views: Iterable[memoryview]) -> int:
    """Drop the pages under `views` (memoryviews into a read-only LMDB map) from this process's
    resident set; returns the bytes released. Safe whatever else reads them: the next touch
    maps the page again from the page cache. A no-op where madvise is not available."""
    if _madvise is None:
        return 0
    ranges = []
    for view in views:
        if len(view) == 0:
            continue
        addr = np.frombuffer(view, np.uint8).ctypes.data
        ranges.append((addr - addr % _PAGE, -(-(addr + len(view)) // _PAGE) * _PAGE))
    ranges.sort()
    released = 0
    start = end = None
    for lo, hi in ranges + [(None, None)]:  # the sentinel flushes the last run
        if start is not None and (lo is None or lo > end):
            _madvise(start, end - start, _MADV_DONTNEED)
            released += end - start
            start = None
        if lo is None:
            break
        if start is None:
            start, end = lo, hi
        else:
            end = max(end, hi)
    return released


def release_span(first: memoryview, last: memoryview) -> int:
    """Drop the pages from `first`'s to `last`'s (memoryviews into a read-only LMDB map) from
    this process's resident set, whatever lies between; returns the bytes released. For a
    reader walking small records in key order: they sit inline in leaf pages that a DB built in
    key order (convert_imageset, ours or Caffe's) lays out in order, so the span is about the
    pages the walk passed, found from two addresses instead of one per record (release_pages
    costs ~1 us per view, more than summing a 16x16 record). Pages in the span not read yet are
    mapped again from the page cache when they are; a no-op without madvise."""
    if _madvise is None or not len(first) or not len(last):
        return 0
    a = np.frombuffer(first, np.uint8).ctypes.data
    b = np.frombuffer(last, np.uint8).ctypes.data
    lo, hi = min(a, b), max(a + len(first), b + len(last))
    lo, hi = lo - lo % _PAGE, -(-hi // _PAGE) * _PAGE
    _madvise(lo, hi - lo, _MADV_DONTNEED)
    return hi - lo


def lmdb_content_digest(path: str | os.PathLike) -> str:
    """sha256 over the records (key and value, in key order): the same records give the same
    digest even when data.mdb differs (page layout, map size, free pages)."""
    digest = RecordDigest()
    passed: list[memoryview] = []
    with LmdbReader(path) as reader:
        for key, value in reader.iter_buffers():
            digest.update(key, value)  # read in place from the map, no copies
            passed.append(value)
            if len(passed) >= RELEASE_EVERY:
                release_pages(passed)
                passed.clear()
        release_pages(passed)
    return digest.hexdigest()


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove what builds of `target` that no longer run left beside it: temporary build
    directories, and the old DB an overwrite had moved aside when it was killed."""
    removed: list[Path] = []
    prefixes = [f".{target.name}{mark}" for mark in (_PARTIAL_MARK, _OLD_MARK)]
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class _BackgroundFlusher:
    """fdatasync()s the data file on its own thread after each commit, so the disk writes
    overlap the work that produces the next records instead of piling up for one long sync
    at the end (fsyncing 200 MB takes about as long as decoding 1000 JPEGs)."""

    def __init__(self, data_file: Path) -> None:
        self._fd = os.open(data_file, os.O_RDONLY)
        self._wanted = threading.Event()
        self._stop = False
        self.error: OSError | None = None  # a failed sync (full disk), raised by close()
        self._thread = threading.Thread(target=self._run, name="lmdb-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as err:  # kept for the writer's thread: no traceback from here
                self.error = err
                return

    def request(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        """Stop the thread; raise the OSError of a sync that failed."""
        if not self._stop:
            self._stop = True
            self._wanted.set()
            self._thread.join()
            os.close(self._fd)
        if self.error is not None:
            raise self.error


def check_replaceable(path: Path) -> None:
    """--overwrite replaces an LMDB, nothing else: refuse a file, a link, or a folder holding
    anything besides data.mdb and lock.mdb (naming one such entry), so a mistyped DB_NAME
    never deletes a user's files."""
    how = (f"--overwrite replaces only an LMDB folder ({_DATA_FILE} + {_LOCK_FILE}); "
           f"move it away yourself or choose another DB_NAME")
    if path.is_symlink():
        raise ImagenetError(f"{path} is a symbolic link, not an LMDB; {how}")
    if not path.is_dir():
        raise ImagenetError(f"{path} is a file, not an LMDB; {how}")
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        raise from_os_error(err, "cannot list") from None
    for entry in entries:
        if entry.name not in _LMDB_FILES or entry.is_symlink() or not entry.is_file():
            raise ImagenetError(f"{path} holds {entry.name!r}, so it is not only an LMDB; {how}")


class LmdbWriter:
    """Build a new LMDB at `path`: put() records, and on a clean exit of the `with` block the
    finished DB is renamed into place. An exception (or a kill) leaves `path` untouched.

    Records are committed every `commit_every` puts (or `commit_bytes` bytes), each
    transaction written on the commit thread (module docstring) while the caller goes on; a
    full map is doubled and the transaction redone, so MDB_MAP_FULL never reaches the caller.
    An error of the commit thread is raised by the next put(), commit() or finish(). `path`
    must not exist unless overwrite=True (then it is replaced only once the new DB is complete).

    With digest=True the writer hashes records as they are put, so `content_digest()` after
    the build needs no second pass over the DB when keys were put in increasing order (as
    convert_imageset puts them); otherwise it falls back to lmdb_content_digest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        commit_every: int = COMMIT_EVERY_DEFAULT,
        map_size: int = INITIAL_MAP_SIZE,
        digest: bool = False,
        commit_bytes: int = COMMIT_BYTES_DEFAULT,
    ) -> None:
        if commit_every < 1:
            raise ImagenetError(f"commit_every must be >= 1, got {commit_every}")
        self.path = Path(path)
        self.overwrite = overwrite
        self.commit_every = commit_every
        if os.path.lexists(self.path):
            if not overwrite:
                raise ImagenetError(
                    f"{self.path} already exists; refusing to write into an existing DB (Caffe "
                    f"refuses too). Remove it or pass --overwrite.")
            check_replaceable(self.path)
        if not self.path.parent.is_dir():
            raise ImagenetError(f"{self.path}: parent directory {self.path.parent} does not exist")
        self.stale_removed = clean_stale_partials(self.path)
        self.tmp_path = self.path.parent / (
            f".{self.path.name}{_PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.tmp_path.mkdir()
        except OSError as err:
            raise from_os_error(err, "cannot create the LMDB", self.path) from None
        # sync=False: nothing is durable until the final env.sync(), and nothing needs to be:
        # an interrupted build is thrown away anyway. Saves an fsync per commit.
        try:
            with lmdb_errors(self.path, "cannot create the LMDB"):
                self.env = lmdb.open(str(self.tmp_path), map_size=map_size, subdir=True,
                                     sync=False, metasync=False, meminit=True, max_dbs=0)
        except ImagenetError:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            raise
        self.map_size = map_size
        self.max_key_size = self.env.max_key_size()
        self.count = 0  # records committed
        self.puts = 0  # records put (committed or pending)
        self.commit_bytes = commit_bytes
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._closed = False
        self._flusher = _BackgroundFlusher(self.tmp_path / _DATA_FILE)
        self._digest = RecordDigest() if digest else None
        self._last_key: bytes | None = None
        self._keys_increasing = True
        self._pending_append = True  # every pending key is above every key before it
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-commit")
        self._in_flight: collections.deque[Future[None]] = collections.deque()
        _keep_freed_pages.acquire()
        self._holds_pages = True

    def put(self, key: bytes, value: bytes, hashed: bytes | None = None) -> None:
        """Queue one record; `hashed` (value_hash(value)) spares the digest a hash here."""
        if self._closed:
            raise ImagenetError(f"{self.path}: put() after the writer was closed")
        if not 0 < len(key) <= self.max_key_size:
            raise ImagenetError(f"{self.path}: key {key[:64]!r}... is {len(key)} bytes; LMDB "
                                f"keys hold 1 to {self.max_key_size} bytes")
        self._pending.append((key, value))
        self._pending_bytes += len(key) + len(value)
        self.puts += 1
        if self._keys_increasing and self._last_key is not None and key <= self._last_key:
            self._keys_increasing = False  # LMDB's key order is not put order any more
        if self._keys_increasing:
            if self._digest is not None:
                self._digest.update(key, value, hashed)
            self._last_key = key
        else:
            self._pending_append = False
        if len(self._pending) >= self.commit_every or self._pending_bytes >= self.commit_bytes:
            self.commit()

    def commit(self) -> None:
        """Hand the pending records to the commit thread (waiting while COMMITS_IN_FLIGHT
        transactions are already queued)."""
        if self._pending:
            batch, append = self._pending, self._pending_append
            self._pending, self._pending_bytes = [], 0
            self._pending_append = self._keys_increasing
            self._in_flight.append(self._committer.submit(self._write, batch, append))
        while len(self._in_flight) > COMMITS_IN_FLIGHT:
            self._in_flight.popleft().result()  # re-raises the commit thread's error

    def wait(self) -> None:
        """Commit what is pending and wait until the commit thread has written everything."""
        self.commit()
        while self._in_flight:
            self._in_flight.popleft().result()

    def _write(self, batch: list[tuple[bytes, bytes]], append: bool) -> None:
        """One transaction, on the commit thread; the map is doubled while it is full."""
        with lmdb_errors(self.path, "cannot write the LMDB"):  # a full disk, say
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        if append:
                            txn.cursor().putmulti(batch, append=True)
                        else:
                            for key, value in batch:
                                txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    # db_lmdb.cpp DoubleMapSize(): the aborted transaction is simply redone.
                    # No other transaction of this environment is open (this thread owns them).
                    self.map_size *= 2
                    self.env.set_mapsize(self.map_size)
        self.count += len(batch)
        self._flusher.request()

    def finish(self) -> Path:
        """Commit, flush to disk and move the DB into place; returns its path."""
        self.wait()
        self._committer.shutdown(wait=True)
        self._release_pages_hold()
        with lmdb_errors(self.path, "cannot write the LMDB"):
            self._flusher.close()
            self.env.sync(True)  # what the flusher has not written yet, and the meta pages
            self.env.close()
        self._closed = True
        with lmdb_errors(self.path, "cannot move the finished LMDB into place at"):
            if os.path.lexists(self.path):
                if not self.overwrite:
                    raise ImagenetError(f"{self.path} appeared while the new DB was being "
                                        f"built; not replacing it (pass overwrite to replace)")
                check_replaceable(self.path)  # it may have changed since we started
                trash = self.path.parent / (
                    f".{self.path.name}{_OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.rename(self.path, trash)
                os.rename(self.tmp_path, self.path)
                shutil.rmtree(trash, ignore_errors=True)  # a kill here: the next run sweeps it
            else:
                os.rename(self.tmp_path, self.path)
        return self.path

    def content_digest(self) -> str:
        """lmdb_content_digest of the finished DB (streamed when possible)."""
        if not self._closed:
            raise ImagenetError(f"{self.path}: content_digest() before the build finished")
        if self._digest is not None and self._keys_increasing:
            return self._digest.hexdigest()
        return lmdb_content_digest(self.path)

    def abort(self) -> None:
        """Throw the partial build away."""
        for future in self._in_flight:
            future.cancel()
        self._committer.shutdown(wait=True)  # the transaction being written ends first
        self._in_flight.clear()
        self._release_pages_hold()
        with contextlib.suppress(OSError):  # what failed is already being reported
            self._flusher.close()
        if not self._closed:
            self.env.close()
            self._closed = True
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    def _release_pages_hold(self) -> None:
        if self._holds_pages:
            self._holds_pages = False
            _keep_freed_pages.release()

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finish()
        except BaseException:
            self.abort()  # the new DB never reached `path`: drop it
            raise
