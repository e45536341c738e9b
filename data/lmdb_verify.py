"""LMDB's on-disk format, checked with plain file reads before a reader maps the file.

LMDB maps data.mdb and trusts every page number and size it finds there. A file cut short, or
a page number or size garbled inside it, makes LMDB (or the copy of a value that follows) read
past the end of the file: the process dies with SIGBUS, or LMDB's own assertions abort it
(SIGABRT), with no message. So before any reader maps a database, `check_data_file`:

1. reads both meta pages, picks the current one as LMDB does (mdb_env_pick_meta: the higher
   transaction id) and checks the file holds every page it says are in use;
2. walks the main database's B-tree from that meta's root with os.pread (never mmap), a level
   at a time, each level checked as numpy arrays: every page is a branch or leaf page carrying
   its own page number, with a sane node table; every node lies inside its page; every branch
   child, and every overflow run a leaf node points to (F_BIGDATA: its first page number and
   the pages its data size needs), lies within [2, last page in use]; no page is reached
   twice, overflow runs do not overlap each other or the tree; all leaves are at one depth,
   which equals the meta's md_depth, and the leaves hold md_entries records.

Any violation is one ImagenetError naming data.mdb, the page and what is wrong. Overflow pages
are never read: LMDB takes a value's size from its leaf node and only the first overflow
page's header from the run (mdb_node_read), so the run's bounds come from the leaf alone.
Only the tree pages are read: ~22k leaf pages for ILSVRC12's 1.28M-record train LMDB. A
database verified once is remembered for the rest of the process (by device, inode, size,
mtime and the meta's transaction id), so the several opens of one training run walk it once.

The layout (mdb.c of LMDB 0.9, 64-bit builds, little-endian):
  page header (16 bytes): mp_pgno u64 @0, mp_pad u16 @8, mp_flags u16 @10, then mp_lower u16 @12
    and mp_upper u16 @14 (or, on an overflow page, mp_pages u32 @12); mp_ptrs[] u16 @16 hold
    the node offsets from the page start, (mp_lower - 16) / 2 of them.
  MDB_meta at 16 in pages 0 and 1: mm_magic u32 @16, mm_version u32 @20, mm_address @24,
    mm_mapsize @32, mm_dbs[FREE_DBI] @40, mm_dbs[MAIN_DBI] @88, mm_last_pg u64 @136,
    mm_txnid u64 @144. MDB_db (48 bytes): md_pad u32 @0 (the page size, in the free DB's),
    md_flags u16 @4, md_depth u16 @6, md_branch_pages, md_leaf_pages, md_overflow_pages,
    md_entries, md_root (u64 each) @8..@40.
  MDB_node (8 bytes + key + data): mn_lo u16 @0, mn_hi u16 @2, mn_flags u16 @4, mn_ksize u16 @6.
    Branch node: child page = mn_lo | mn_hi << 16 | mn_flags << 32 (NODEPGNO).
    Leaf node: data size = mn_lo | mn_hi << 16 (NODEDSZ); with F_BIGDATA the data is the u64
    page number of an overflow run of OVPAGES(size) = (16 - 1 + size) // psize + 1 pages.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import ImagenetError, from_os_error

DATA_FILE = "data.mdb"
REBUILD = "rebuild it (imagenet convert-imageset) or copy it again from its source"

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 1 << 16
PAGE_HEADER = 16  # PAGEHDRSZ
NODE_HEADER = 8  # NODESIZE
# mp_flags (mdb.c)
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_PAGE_KIND = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2
# mn_flags of leaf nodes
F_BIGDATA, F_SUBDATA = 0x01, 0x02
# md_flags: MDB_DUPSORT databases keep several values per key in sub-pages or sub-trees.
MDB_DUPSORT = 0x04
P_INVALID = (1 << 64) - 1  # md_root of an empty database
FIRST_DATA_PAGE = 2  # pages 0 and 1 are the meta pages
# LMDB's cursors hold at most CURSOR_STACK pages from root to leaf (mdb.c).
CURSOR_STACK = 32

_META_HEAD = struct.Struct("<II")  # mm_magic, mm_version
_META_HEAD_AT = 16
_META_PSIZE = struct.Struct("<I")  # mm_dbs[FREE_DBI].md_pad = the page size
_META_PSIZE_AT = 40
# mm_dbs[MAIN_DBI]: md_flags, md_depth, md_branch_pages, md_leaf_pages, md_overflow_pages,
# md_entries, md_root; then mm_last_pg, mm_txnid.
_META_MAIN = struct.Struct("<HHQQQQQQQ")
_META_MAIN_AT = 92
_META_BYTES = _META_MAIN_AT + _META_MAIN.size
# Tree pages read and checked as one array: bounds the memory a wide level takes (16 MiB).
PAGES_PER_BATCH = 4096

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # Linux and the BSDs
# (st_dev, st_ino, st_size, st_mtime_ns, txnid) of data files whose tree this process has
# walked and found sound.
_verified: set[tuple[int, int, int, int, int]] = set()


@dataclass(frozen=True)
class Meta:
    """What the current meta page says about the main database."""
    page: int  # 0 or 1
    txnid: int
    last_page: int
    page_size: int
    flags: int
    depth: int
    entries: int
    root: int


class _Corrupt(Exception):
    """A violation found by the walk: the page and what is wrong with it."""

    def __init__(self, page: int, what: str) -> None:
        super().__init__(page, what)
        self.page, self.what = page, what


# What to say when a database changes while it is read: a writer is still at work.
BEING_WRITTEN = ("another process is writing it (its last transaction went from {old} to {new} "
                 "while it was read): it is unfinished, not damaged; wait for the writer to "
                 "finish, or read a copy made when it had")


def check_data_file(path: str | os.PathLike) -> int:
    """Check the LMDB at directory `path` BEFORE it is mapped (module docstring); returns the
    bytes the database uses. A header that is not LMDB 0.9's is left to lmdb.open, which names
    the problem itself.

    A writer committing while the tree is walked (a database still being built: LMDB's readers
    see a snapshot, but this walk is plain reads) is told apart from corruption by the meta
    page's transaction id, read again after a violation: it changed, so the database is being
    written, not corrupt."""
    data = Path(path) / DATA_FILE
    try:
        fd = os.open(data, os.O_RDONLY)
    except OSError as err:
        raise from_os_error(err, "cannot read LMDB data file") from None
    try:
        # the meta before the size: a commit in between only makes the file longer
        meta = _read_meta(fd, data, os.fstat(fd).st_size)
        st = os.fstat(fd)
        if meta is None:
            return st.st_size
        needed = (meta.last_page + 1) * meta.page_size
        if st.st_size < needed:
            raise ImagenetError(
                f"{data}: {st.st_size:,} bytes, but its meta page (transaction {meta.txnid}) "
                f"uses {meta.last_page + 1:,} pages of {meta.page_size} bytes = {needed:,} "
                f"bytes: the file is truncated (reading it would crash with SIGBUS); {REBUILD}")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, meta.txnid)
        if key not in _verified:
            try:
                check_tree(fd, meta)
            except _Corrupt as bad:
                now = _read_meta(fd, data, os.fstat(fd).st_size)
                if now is not None and now.txnid != meta.txnid:
                    raise ImagenetError(f"{path}: " + BEING_WRITTEN.format(
                        old=meta.txnid, new=now.txnid)) from None
                raise ImagenetError(
                    f"{data}: page {bad.page}: {bad.what}: the database is corrupt; {REBUILD}"
                ) from None
            _verified.add(key)
        return needed
    except OSError as err:
        raise from_os_error(err, "cannot read LMDB data file", data) from None
    finally:
        os.close(fd)


def last_transaction(path: str | os.PathLike) -> int | None:
    """The transaction id of the LMDB's current meta page (None when it cannot be read)."""
    try:
        fd = os.open(Path(path) / DATA_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        meta = _read_meta(fd, Path(path) / DATA_FILE, os.fstat(fd).st_size)
        return meta.txnid if meta is not None else None
    except (OSError, ImagenetError):
        return None
    finally:
        os.close(fd)


def _read_meta(fd: int, data: Path, size: int) -> Meta | None:
    """The current meta page (None when the file is not LMDB 0.9's layout)."""
    head = os.pread(fd, _META_BYTES, 0)
    if len(head) < _META_BYTES:
        raise ImagenetError(f"{data}: {size} bytes, too short to hold LMDB's header: the file "
                            f"is truncated; {REBUILD}")
    magic, version = _META_HEAD.unpack_from(head, _META_HEAD_AT)
    if magic != MDB_MAGIC or version != MDB_DATA_VERSION:
        return None  # not LMDB 0.9's layout: lmdb.open decides
    (psize,) = _META_PSIZE.unpack_from(head, _META_PSIZE_AT)
    if not (MIN_PAGE_SIZE <= psize <= MAX_PAGE_SIZE and psize & (psize - 1) == 0):
        raise ImagenetError(f"{data}: page size {psize} in the header is not a power of two "
                            f"in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]: the header is corrupt; "
                            f"{REBUILD}")
    second = os.pread(fd, _META_BYTES, psize)
    if len(second) < _META_BYTES:
        raise ImagenetError(f"{data}: {size} bytes, too short to hold LMDB's two meta pages: "
                            f"the file is truncated; {REBUILD}")
    metas = []
    for number, page in enumerate((head, second)):
        magic, version = _META_HEAD.unpack_from(page, _META_HEAD_AT)
        if magic != MDB_MAGIC or version != MDB_DATA_VERSION:
            raise ImagenetError(f"{data}: the second meta page is not LMDB's (magic "
                                f"{magic:#x}, version {version}): the file is corrupt; "
                                f"{REBUILD}")
        (flags, depth, _branch, _leaf, _overflow, entries, root, last_page,
         txnid) = _META_MAIN.unpack_from(page, _META_MAIN_AT)
        metas.append(Meta(number, txnid, last_page, psize, flags, depth, entries, root))
    # mdb_env_pick_meta: meta 1 when its transaction is newer, else meta 0.
    return metas[1] if metas[1].txnid > metas[0].txnid else metas[0]


def check_tree(fd: int, meta: Meta) -> int:
    """Walk the main B-tree of the open data file `fd` (module docstring); returns the number
    of leaf pages. Raises _Corrupt at the first violation."""
    last = meta.last_page
    if meta.root == P_INVALID:
        if meta.entries != 0 or meta.depth != 0:
            raise _Corrupt(meta.page, f"the meta page says the database is empty (no root) "
                                      f"but holds {meta.entries} records at depth {meta.depth}")
        return 0
    if not FIRST_DATA_PAGE <= meta.root <= last:
        raise _Corrupt(meta.page, f"the root page {meta.root} of the meta page (transaction "
                                  f"{meta.txnid}) lies outside the pages in use "
                                  f"[{FIRST_DATA_PAGE}, {last}]")
    dupsort = bool(meta.flags & MDB_DUPSORT)
    seen = np.zeros(0, np.uint64)  # tree pages of the levels above, sorted
    runs_start: list[np.ndarray] = []
    runs_pages: list[np.ndarray] = []
    level = np.array([meta.root], np.uint64)
    depth = entries = leaves = 0
    while True:
        depth += 1
        if depth > CURSOR_STACK:
            raise _Corrupt(int(level[0]), f"the tree is deeper than LMDB's limit of "
                                          f"{CURSOR_STACK} levels (a cycle of pages)")
        seen = _add_level(seen, level)
        kinds, children = set(), []
        for lo in range(0, len(level), PAGES_PER_BATCH):
            batch = level[lo:lo + PAGES_PER_BATCH]
            kind, out = _check_pages(fd, batch, meta, dupsort)
            kinds.add(kind)
            if kind == P_BRANCH:
                children.append(out[0])
            else:
                entries += out[0]
                runs_start.append(out[1])
                runs_pages.append(out[2])
        if len(kinds) > 1:
            raise _Corrupt(int(level[0]), f"level {depth} of the tree mixes branch and leaf "
                                          f"pages")
        if kinds == {P_LEAF}:
            leaves = len(level)
            break
        level = np.concatenate(children)
    if depth != meta.depth:
        raise _Corrupt(meta.page, f"the tree has {depth} levels but the meta page says "
                                  f"{meta.depth}")
    if not dupsort and entries != meta.entries:
        raise _Corrupt(meta.page, f"the leaf pages hold {entries:,} records but the meta page "
                                  f"says {meta.entries:,}")
    _check_disjoint(seen, np.concatenate(runs_start), np.concatenate(runs_pages))
    return leaves


def _add_level(seen: np.ndarray, level: np.ndarray) -> np.ndarray:
    """`seen` with the pages of a new level added; a page reached twice (a cycle, or two
    parents sharing a child) is refused here, before a cycle can multiply the next level."""
    ordered = np.sort(level)
    twice = ordered[1:] == ordered[:-1]
    if twice.any():
        raise _Corrupt(int(ordered[1:][twice][0]), "the tree reaches this page twice")
    at = np.searchsorted(seen, ordered)
    again = (at < len(seen)) & (seen[np.minimum(at, len(seen) - 1)] == ordered) \
        if len(seen) else np.zeros(len(ordered), bool)
    if again.any():
        raise _Corrupt(int(ordered[_first(again)]), "the tree reaches this page twice (a "
                                                    "branch points back up the tree)")
    return np.union1d(seen, ordered)


def _read_pages(fd: int, pages: np.ndarray, psize: int) -> bytearray:
    """The pages, one after the other, read with pread (the caller checked that each lies
    inside the file)."""
    buf = bytearray(len(pages) * psize)
    view = memoryview(buf)
    numbers = pages.tolist()
    if _WILLNEED is not None:
        # Queue every read of the batch before waiting for the first: on a cold cache the
        # device serves them in parallel (an ILSVRC12-sized walk, 18k leaf pages: 1.2 s -> 0.4 s).
        for page in numbers:
            os.posix_fadvise(fd, page * psize, psize, _WILLNEED)
    for i, page in enumerate(numbers):
        got = os.preadv(fd, [view[i * psize:(i + 1) * psize]], page * psize)
        if got != psize:
            raise _Corrupt(page, f"only {got} of its {psize} bytes could be read")
    return buf


def _fields(buf: bytearray, dtype: str) -> np.ndarray:
    """`buf` seen as little-endian integers of `dtype` starting at EVERY byte offset: element i
    is the value at byte i, so one fancy index gathers fields at any (unaligned) offsets."""
    width = np.dtype(dtype).itemsize
    return np.ndarray((len(buf) - width + 1,), dtype, buffer=buf, strides=(1,))


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_pages(fd: int, pages: np.ndarray, meta: Meta, dupsort: bool
                 ) -> tuple[int, tuple]:
    """Check one batch of pages of one tree level. Returns (P_BRANCH, (children,)) or
    (P_LEAF, (records, overflow run starts, overflow run lengths))."""
    psize, last = meta.page_size, meta.last_page
    buf = _read_pages(fd, pages, psize)
    u16, u64 = _fields(buf, "<u2"), _fields(buf, "<u8")
    starts = np.arange(len(pages), dtype=np.int64) * psize
    own = u64[starts]
    bad = own != pages
    if bad.any():
        i = _first(bad)
        raise _Corrupt(int(pages[i]), f"its header says it is page {int(own[i])}")
    flags = u16[starts + 10]
    kind = flags & _PAGE_KIND
    if not ((kind == P_BRANCH).all() or (kind == P_LEAF).all()):
        i = _first(kind != kind[0]) if int(kind[0]) in (P_BRANCH, P_LEAF) else 0
        raise _Corrupt(int(pages[i]), f"a tree page with flags {int(flags[i]):#x}, neither "
                                      f"a branch nor a leaf page")
    branch = int(kind[0]) == P_BRANCH
    lower = u16[starts + 12].astype(np.int64)
    upper = u16[starts + 14].astype(np.int64)
    bad = (lower < PAGE_HEADER + 2) | (lower > upper) | (upper > psize) | \
        ((lower - PAGE_HEADER) % 2 != 0)
    if bad.any():
        i = _first(bad)
        raise _Corrupt(int(pages[i]), f"its node table (lower {int(lower[i])}, upper "
                                      f"{int(upper[i])}) does not fit a page of {psize} bytes")
    counts = (lower - PAGE_HEADER) // 2
    total = int(counts.sum())
    which = np.repeat(np.arange(len(pages)), counts)  # the page of each node
    slot = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    base = which * psize
    ptr = u16[base + PAGE_HEADER + 2 * slot].astype(np.int64)
    bad = (ptr < upper[which]) | (ptr + NODE_HEADER > psize)
    if bad.any():
        i = _first(bad)
        raise _Corrupt(int(pages[which[i]]), f"node {int(slot[i])} at offset {int(ptr[i])} "
                                             f"lies outside the page's node area "
                                             f"[{int(upper[which[i]])}, {psize})")
    node = base + ptr
    lo_hi = u16[node].astype(np.uint64) | u16[node + 2].astype(np.uint64) << np.uint64(16)
    nflags = u16[node + 4].astype(np.uint64)
    ksize = u16[node + 6].astype(np.int64)
    key_end = ptr + NODE_HEADER + ksize
    if branch:
        bad = key_end > psize
        if bad.any():
            i = _first(bad)
            raise _Corrupt(int(pages[which[i]]), f"the key of branch node {int(slot[i])} "
                                                 f"({int(ksize[i])} bytes) runs past the page")
        child = lo_hi | nflags << np.uint64(32)
        bad = (child < FIRST_DATA_PAGE) | (child > last)
        if bad.any():
            i = _first(bad)
            raise _Corrupt(int(pages[which[i]]), f"branch node {int(slot[i])} points to page "
                                                 f"{int(child[i])}, outside the pages in use "
                                                 f"[{FIRST_DATA_PAGE}, {last}]")
        return P_BRANCH, (child,)
    dsize = lo_hi.astype(np.int64)
    big = (nflags & np.uint64(F_BIGDATA)) != 0
    inline = np.where(big, 8, dsize)  # an overflow node holds the run's page number
    bad = key_end + inline > psize
    if bad.any():
        i = _first(bad)
        raise _Corrupt(int(pages[which[i]]), f"leaf node {int(slot[i])} (key {int(ksize[i])} "
                                             f"bytes, data {int(inline[i])} bytes) runs past "
                                             f"the page")
    at = key_end[big] + base[big]
    start = u64[at]
    run = (PAGE_HEADER - 1 + dsize[big]) // psize + 1  # OVPAGES
    # Compared as Python-size-safe values: a garbled start near 2**64 must not wrap.
    bad = (start < FIRST_DATA_PAGE) | (start > last) | \
        (run.astype(np.uint64) > np.uint64(last) - start + np.uint64(1))
    if bad.any():
        i = _first(bad)
        j = int(np.flatnonzero(big)[i])
        raise _Corrupt(int(pages[which[j]]), f"leaf node {int(slot[j])} points to overflow "
                                             f"pages {int(start[i])}..{int(start[i]) + int(run[i]) - 1} "
                                             f"for its {int(dsize[j]):,}-byte value, outside "
                                             f"the pages in use [{FIRST_DATA_PAGE}, {last}]")
    if not dupsort:
        sub = (nflags & np.uint64(F_SUBDATA)) != 0
        if sub.any():
            i = _first(sub)
            raise _Corrupt(int(pages[which[i]]), f"leaf node {int(slot[i])} is marked as a "
                                                 f"sub-database, which a database of records "
                                                 f"never holds")
    return P_LEAF, (total, start, run.astype(np.uint64))


def _check_disjoint(tree: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
    """No page is reached twice: overflow runs do not overlap each other and no tree page
    (`tree`: sorted, distinct) lies inside a run."""
    if not len(starts):
        return
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], starts[order] + lengths[order]  # ends exclusive
    clash = starts[1:] < ends[:-1]
    if clash.any():
        i = _first(clash)
        raise _Corrupt(int(starts[i + 1]), f"two values' overflow pages overlap (runs at "
                                           f"{int(starts[i])} and {int(starts[i + 1])})")
    run = np.searchsorted(starts, tree, side="right") - 1
    inside = (run >= 0) & (tree < ends[np.maximum(run, 0)])
    if inside.any():
        i = _first(inside)
        raise _Corrupt(int(tree[i]), f"a tree page lies inside the overflow pages of a "
                                     f"value (run at {int(starts[run[i]])})")
