"""Safe, streaming, resumable extraction of the ILSVRC12 archives.

- `extract_train(tar, root)`: ILSVRC2012_img_train.tar is a tar of per-synset tars
  (`n01440764.tar` ...). Each inner tar is streamed straight out of the outer one (never written
  to disk, so extraction needs the images' size, not twice the archive's) into a work directory
  `root/.extract-state/tmp/<wnid>`, which is renamed to `root/train/<wnid>` once complete; then a
  marker `root/.extract-state/train/<wnid>.done` is written. A rerun skips synsets whose marker
  and folder both exist and redoes everything else (a folder without a marker is not trusted:
  the run that made it may have been killed).
  Several synsets are extracted at once (`workers`, one per core by default): each worker
  process reads its inner tar at its own offset of the (uncompressed) outer archive through a
  handle of its own, and copies the files with copy_file_range (in the kernel). The tree, the
  markers and the checks are the same for any number of workers.
- `extract_val(tar, root)`: the flat val tar into `root/val/`; each file is written under a
  temporary name and renamed, so a file that exists is complete and a rerun skips it.
- `extract_archive(path, dest)`: any tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) into `dest`.
Every member is checked before anything is written: absolute names, `..` components, symlinks,
hard links, devices and FIFOs are refused with an error naming the member (for the outer and
val tars the whole archive is checked first, so a bad archive writes nothing at all). A
free-space check runs before starting and says how many bytes are needed.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import lzma
import multiprocessing
import os
import re
import shutil
import tarfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, IO

from data import ilsvrc12
from data.atomic import remove_stale_temps
from data.host import available_cores, exit_with
from data.download import check_free_space
from data.errors import ImagenetError, from_os_error

ProgressFn = Callable[[int, "int | None"], None]

# What reading a damaged archive raises besides TarError: a cut or corrupt gzip/bz2/xz stream
# (EOFError, zlib.error, lzma.LZMAError, and OSError for gzip's BadGzipFile and bz2).
ARCHIVE_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)

STATE_DIR = ".extract-state"
MARKER_SUFFIX = ".done"
COPY_CHUNK = 1 << 20
INNER_TAR_RE = re.compile(r"^(n\d{8})\.tar$")
# Bytes one copy_file_range call moves (a JPEG is ~110 KB: usually one call per file).
COPY_RANGE_CHUNK = 16 << 20
# copy_file_range is refused across filesystems on older kernels and by some filesystems:
# then bytes go through read and write.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                             errno.EBADF})
# gzip, bzip2 and xz streams start with these bytes; a plain tar with none of them.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_MAGIC_BYTES = 6


@dataclass
class ExtractResult:
    dest: Path
    files: int = 0  # files written by this run
    bytes: int = 0  # bytes written by this run
    skipped_files: int = 0  # already complete from an earlier run
    synsets_extracted: int = 0  # train only
    synsets_skipped: int = 0  # train only: complete from an earlier run
    seconds: float = 0.0


def safe_member_path(member: tarfile.TarInfo, where: str) -> PurePosixPath | None:
    """The member's relative path if it is safe to write, None for a directory entry; raises
    ImagenetError for absolute names, `..`, links, devices and anything else not a file."""
    name = member.name
    kind = ("symlink" if member.issym() else "hard link" if member.islnk() else
            "FIFO" if member.isfifo() else "device" if member.isdev() else None)
    if kind:
        raise ImagenetError(f"{where}: refusing {kind} member {name!r} "
                            f"(-> {member.linkname!r})" if member.linkname else
                            f"{where}: refusing {kind} member {name!r}")
    if not (member.isreg() or member.isdir()):
        raise ImagenetError(f"{where}: refusing member {name!r} of tar type {member.type!r}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ImagenetError(f"{where}: refusing absolute member name {name!r}")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImagenetError(f"{where}: refusing member {name!r}: it contains '..'")
    if "\0" in name:
        raise ImagenetError(f"{where}: refusing member name with a NUL byte: {name!r}")
    if not parts:
        if member.isdir():
            return None
        raise ImagenetError(f"{where}: refusing member with an empty name")
    return None if member.isdir() else PurePosixPath(*parts)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive SILENTLY at a damaged header after the first member, or where the
    file stops without tar's end-of-archive blocks: a corrupt or cut archive would extract only
    its first members with success. Raising SubsequentHeaderError makes tarfile report those
    as ReadError instead; only the all-zero end-of-archive block still ends the archive."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):  # type: ignore[no-untyped-def]
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise tarfile.SubsequentHeaderError(
                "the archive stops before its end-of-archive blocks: it is truncated") from None
        except tarfile.InvalidHeaderError as err:
            raise tarfile.SubsequentHeaderError(f"damaged member header ({err})") from None


def _mkdirs(folder: Path) -> None:
    """mkdir -p, with an OSError (a file in the way, a read-only disk) as one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise from_os_error(err, "cannot create folder", folder) from None


def _copy(src: IO[bytes], dst_path: Path, on_bytes: Callable[[int], None] | None,
          *, atomic: bool = True, where: str = "") -> int:
    """Stream `src` (member `where` of an archive) into `dst_path` (via a temporary name +
    rename when `atomic`); returns the bytes written. Inside a synset's work folder the folder
    itself is the temporary. A failed write or read removes the temporary."""
    tmp = dst_path.with_name(f".{dst_path.name}.part-extract") if atomic else dst_path
    written = 0
    try:
        with open(tmp, "wb") as out:
            while True:
                try:
                    chunk = src.read(COPY_CHUNK)
                except ARCHIVE_READ_ERRORS as err:
                    raise ImagenetError(f"{where}: corrupt or truncated archive data "
                                        f"({err})") from None
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        if atomic:
            os.replace(tmp, dst_path)
    except OSError as err:  # disk full, permissions: one line naming the file
        if atomic:
            with contextlib.suppress(OSError):  # a read-only disk refuses even this unlink
                tmp.unlink(missing_ok=True)
        raise from_os_error(err, "cannot write", dst_path) from None
    except ImagenetError:
        if atomic:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    return written


class _Counter:
    """Bytes done out of a total, forwarded to the caller's progress callback (from any of the
    extracting threads)."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.done, self.total, self.progress = 0, total, progress
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total)


def _open(path: Path, mode: str = "r:*") -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode, tarinfo=_StrictTarInfo)
    except FileNotFoundError:
        raise ImagenetError(f"{path}: no such file") from None
    except tarfile.TarError as err:
        if mode == "r:*" and str(err).startswith("file could not be opened successfully"):
            # tarfile tried every compression in turn; its report lists them all
            raise ImagenetError(f"{path}: not a tar archive (plain, gzip, bzip2 or xz); check "
                                "that it is the archive you meant") from None
        raise ImagenetError(f"{path}: not a readable tar archive ({err})") from None
    except OSError as err:
        raise from_os_error(err, "cannot read archive") from None
    except (EOFError, zlib.error, lzma.LZMAError) as err:
        raise _corrupt(str(path), err) from None


def _corrupt(where: str, err: BaseException) -> ImagenetError:
    return ImagenetError(f"{where}: corrupt or truncated archive ({err}); download it again "
                         "(nothing was written)")


def _drain(tar: tarfile.TarFile) -> None:
    """Read the (decompressed) stream to its end, so gzip/bz2/xz check their own trailer:
    tarfile stops at the end-of-archive blocks and would never see a cut or corrupt end."""
    if tar.fileobj is None:
        return
    # From where tarfile stopped (no seek: a backward seek in a gzip stream decompresses
    # it again from the start).
    while tar.fileobj.read(COPY_CHUNK):
        pass


def _check_layout(checked: list[tuple[tarfile.TarInfo, PurePosixPath | None]], where: str
                  ) -> None:
    """Refuse members that cannot all be written: a file `a` and a member inside `a/` (a file
    cannot be a folder), or a folder entry `a/` and a file `a`."""
    files = {rel: m.name for m, rel in checked if rel is not None}
    dirs: dict[PurePosixPath, str] = {}
    for member, rel in checked:
        if rel is None:
            parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
            if parts:
                dirs.setdefault(PurePosixPath(*parts), member.name)
        else:
            for parent in list(rel.parents)[:-1]:  # every folder above it ('.' excluded)
                dirs.setdefault(parent, member.name)
    for rel, name in files.items():
        if rel in dirs:
            raise ImagenetError(f"{where}: member {name!r} is a file, but member {dirs[rel]!r} "
                                f"needs {str(rel)!r} to be a folder; the archive cannot be "
                                "extracted as it is (nothing was written)")


def _checked(tar: tarfile.TarFile, where: str) -> list[tuple[tarfile.TarInfo, PurePosixPath | None]]:
    try:
        members = tar.getmembers()
        _drain(tar)
    except ARCHIVE_READ_ERRORS as err:
        raise _corrupt(where, err) from None
    checked = [(m, safe_member_path(m, where)) for m in members]
    _check_layout(checked, where)
    return checked


def _extract_flat(path: Path, target: Path, progress: ProgressFn | None,
                  skip_complete: bool) -> ExtractResult:
    """Shared by extract_val and extract_archive: check all, check space, write each file."""
    start = time.monotonic()
    path = Path(path)
    result = ExtractResult(dest=target)
    with _open(path) as tar:
        checked = _checked(tar, str(path))
        todo = []
        for member, rel in checked:
            if rel is None:
                continue
            final = target / rel
            if skip_complete and final.is_file() and final.stat().st_size == member.size:
                result.skipped_files += 1
                continue
            todo.append((member, final))
        _mkdirs(target)
        check_free_space(target, sum(m.size for m, _ in todo), f"extracting {path.name}")
        counter = _Counter(sum(m.size for m, _ in todo), progress)
        for member, final in todo:
            _mkdirs(final.parent)
            src = tar.extractfile(member)
            result.bytes += _copy(src, final, counter.add, where=f"{path}:{member.name}")
            result.files += 1
    result.seconds = time.monotonic() - start
    return result


def extract_val(tar_path: Path, dest_root: Path, *, progress: ProgressFn | None = None
                ) -> ExtractResult:
    """ILSVRC2012_img_val.tar -> dest_root/val/<file>; files already complete are skipped."""
    return _extract_flat(Path(tar_path), Path(dest_root) / ilsvrc12.VAL_DIR, progress, True)


def extract_archive(path: Path, dest: Path, *, progress: ProgressFn | None = None
                    ) -> ExtractResult:
    """Any tar archive (compression auto-detected) into `dest`, with the same safety checks."""
    return _extract_flat(Path(path), Path(dest), progress, False)


def _marker(state: Path, wnid: str) -> Path:
    return state / f"{wnid}{MARKER_SUFFIX}"


def synset_complete(dest_root: Path, wnid: str) -> bool:
    """Whether `wnid` was fully extracted by extract_train (marker and folder both present)."""
    root = Path(dest_root)
    return (_marker(root / STATE_DIR / ilsvrc12.TRAIN_DIR, wnid).is_file()
            and (root / ilsvrc12.TRAIN_DIR / wnid).is_dir())


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a file, as a seekable file of their own: one inner tar of
    the outer one, read through a handle of its own so that several are read at once."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb")
        self.start, self.size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = max(0, min(len(buffer), self.size - self._pos))
        got = os.preadv(self._f.fileno(), [memoryview(buffer)[:n]], self.start + self._pos)
        self._pos += got
        return got

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


def _copy_range(src: _Window, offset: int, size: int, dst_path: Path, where: str) -> int:
    """Copy `size` bytes at `offset` of the window into a new file, in the kernel where it can
    (copy_file_range: no trip through Python's buffers, no GIL), else by reads and writes."""
    src_fd, at = src.fileno(), src.start + offset
    try:
        with open(dst_path, "wb") as out:
            done = 0
            kernel = hasattr(os, "copy_file_range")
            while done < size:
                want = min(size - done, COPY_RANGE_CHUNK)
                n = -1
                if kernel:
                    try:
                        n = os.copy_file_range(src_fd, out.fileno(), want, at + done)
                    except OSError as err:
                        if err.errno not in _NO_KERNEL_COPY:
                            raise
                        kernel = False
                if not kernel:
                    out.write(os.pread(src_fd, want, at + done))
                    n = out.tell() - done
                if n <= 0:
                    raise ImagenetError(f"{where}: corrupt or truncated archive data (the "
                                        f"archive ends inside this member)")
                done += n
    except OSError as err:
        raise from_os_error(err, "cannot write", dst_path) from None
    return size


def _is_plain_tar(path: Path) -> bool:
    """Not compressed: its inner tars can be read in place, each at its own offset."""
    with open(path, "rb") as f:
        head = f.read(_MAGIC_BYTES)
    return not head.startswith(_COMPRESSED_MAGIC)


class _Synsets:
    """Extracting the per-synset tars of one train archive (the shared paths and counters)."""

    def __init__(self, tar_path: Path, root: Path, counter: "_Counter", plain: bool) -> None:
        self.tar_path, self.counter, self.plain = tar_path, counter, plain
        self.train_dir = root / ilsvrc12.TRAIN_DIR
        self.state = root / STATE_DIR / ilsvrc12.TRAIN_DIR
        self.work = root / STATE_DIR / "tmp"

    def extract(self, member: "tarfile.TarInfo | _Member", wnid: str,
                outer: tarfile.TarFile | None = None) -> tuple[int, int]:
        """One synset into its work folder, then into place and marked done; (files, bytes)."""
        files, nbytes = self.extract_to_work(member, wnid, outer)
        self.place(member, wnid, files, nbytes)
        return files, nbytes

    def extract_to_work(self, member: "tarfile.TarInfo | _Member", wnid: str,
                        outer: tarfile.TarFile | None = None,
                        check: Callable[[], None] | None = None) -> tuple[int, int]:
        """One synset into its work folder (what a worker process does); (files, bytes).
        Reads the outer tar at the member's offset (plain archives) or from `outer`; `check`
        runs before each file (it raises to stop)."""
        where = f"{self.tar_path}:{member.name}"
        tmp = self.work / wnid
        try:
            if tmp.exists():  # left by a killed run: never trusted
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as err:
            raise from_os_error(err, "cannot prepare the work folder", tmp) from None
        files = nbytes = 0
        try:
            if self.plain:
                with _Window(self.tar_path, member.offset_data, member.size) as window, \
                        tarfile.open(fileobj=window, mode="r:", tarinfo=_StrictTarInfo) as inner:
                    for im in inner:
                        if check is not None:
                            check()
                        final = self._target(tmp, im, where)
                        if final is not None:
                            nbytes += _copy_range(window, im.offset_data, im.size, final,
                                                  f"{where}:{im.name}")
                            self.counter.add(im.size)
                            files += 1
            else:
                assert outer is not None, "a compressed archive is read through `outer`"
                inner = tarfile.open(fileobj=outer.extractfile(member), mode="r|",
                                     tarinfo=_StrictTarInfo)
                for im in inner:
                    final = self._target(tmp, im, where)
                    if final is not None:
                        nbytes += _copy(inner.extractfile(im), final, self.counter.add,
                                        atomic=False, where=f"{where}:{im.name}")
                        files += 1
        except ARCHIVE_READ_ERRORS as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImagenetError(f"{where}: corrupt synset tar ({err})") from None
        except ImagenetError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return files, nbytes

    def place(self, member: "tarfile.TarInfo | _Member", wnid: str, files: int,
              nbytes: int) -> None:
        """Move a synset from its work folder into place and mark it done: always in the
        process that started the extraction, so a killed run leaves nothing of its workers
        outside the work folders, which a rerun removes."""
        tmp = self.work / wnid
        final_dir = self.train_dir / wnid
        try:
            if final_dir.exists():  # a folder without a marker: incomplete or not ours
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
            # Guards against kills (the page cache survives those), not power loss: no fsync.
            ilsvrc12.atomic_write_text(_marker(self.state, wnid),
                                       json.dumps({"files": files, "bytes": nbytes}) + "\n",
                                       durable=False)
        except OSError as err:
            raise from_os_error(err, "cannot move the extracted synset into place at",
                                final_dir) from None
        self.counter.add(member.size - nbytes)  # headers and padding count as done too

    @staticmethod
    def _target(tmp: Path, im: tarfile.TarInfo, where: str) -> Path | None:
        rel = safe_member_path(im, where)
        if rel is None:
            return None
        final = tmp / rel
        if len(rel.parts) > 1:
            _mkdirs(final.parent)
        return final


@dataclass(frozen=True)
class _Member:
    """What a worker process needs of a synset tar's TarInfo."""

    name: str
    offset_data: int
    size: int


def _extract_in_worker(tar_path: str, root: str, member: _Member, wnid: str) -> tuple[int, int]:
    """One synset in a worker process (its progress is counted by the parent when it ends).
    The worker exits when the process that started the pool is gone (_init_worker): a killed
    extraction must not go on writing beside the rerun that replaces it."""
    synsets = _Synsets(Path(tar_path), Path(root), _Counter(member.size, None), plain=True)
    return synsets.extract_to_work(member, wnid)


def _init_worker(owner: int) -> None:
    exit_with(owner)


def extract_train(tar_path: Path, dest_root: Path, *, progress: ProgressFn | None = None,
                  workers: int | None = None) -> ExtractResult:
    """ILSVRC2012_img_train.tar (a tar of per-synset tars) -> dest_root/train/<wnid>/<file>,
    resumable per synset (see the module docstring). `workers` synsets are extracted at once
    (default: one per core), each read at its own offset of the archive; a compressed outer
    archive is read in one stream, one synset after the other."""
    start = time.monotonic()
    tar_path, root = Path(tar_path), Path(dest_root)
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ImagenetError(f"workers must be >= 1, got {workers}")
    result = ExtractResult(dest=root / ilsvrc12.TRAIN_DIR)
    with _open(tar_path) as outer:
        todo: list[tuple[tarfile.TarInfo, str]] = []
        for member, rel in _checked(outer, str(tar_path)):
            if rel is None:
                continue
            m = INNER_TAR_RE.match(str(rel))
            if not m:
                raise ImagenetError(
                    f"{tar_path}: member {member.name!r} is not a per-synset tar "
                    "(<wnid>.tar); is this ILSVRC2012_img_train.tar? (use extract_archive or "
                    "`imagenet extract --kind archive` for other tars)")
            if synset_complete(root, m.group(1)):
                result.synsets_skipped += 1
                continue
            todo.append((member, m.group(1)))
        # An inner tar is its files plus 512-byte headers: its size bounds what we write.
        needed = sum(member.size for member, _ in todo)
        counter = _Counter(needed, progress)
        synsets = _Synsets(tar_path, root, counter, _is_plain_tar(tar_path))
        for d in (synsets.train_dir, synsets.state, synsets.work):
            _mkdirs(d)
        remove_stale_temps(synsets.state)  # markers a killed run was writing
        check_free_space(root, needed, f"extracting {tar_path.name}")
        if not synsets.plain or workers == 1:
            done = (synsets.extract(member, wnid, outer) for member, wnid in todo)
            for files, nbytes in done:
                result.files += files
                result.bytes += nbytes
                result.synsets_extracted += 1
        else:
            # Processes, not threads: a synset is ~1300 files whose headers, names and folders
            # are Python work under the GIL; only the copies would run in parallel on threads.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(workers, mp_context=context,
                                     initializer=_init_worker,
                                     initargs=(os.getpid(),)) as pool:
                futures = [(member, wnid, pool.submit(
                    _extract_in_worker, str(tar_path), str(root),
                    _Member(member.name, member.offset_data, member.size), wnid))
                    for member, wnid in todo]
                try:
                    for member, wnid, future in futures:  # archive order: the first failure is reported
                        files, nbytes = future.result()
                        counter.add(nbytes)  # place() adds the headers and padding
                        synsets.place(member, wnid, files, nbytes)
                        result.files += files
                        result.bytes += nbytes
                        result.synsets_extracted += 1
                except BaseException:
                    for _, _, future in futures:
                        future.cancel()  # the running ones finish (or fail) on their own
                    raise
    result.seconds = time.monotonic() - start
    return result


# How `imagenet extract --kind` chooses what to do with an archive.
EXTRACTORS: dict[str, Callable[..., ExtractResult]] = {
    "train": extract_train,
    "val": extract_val,
    "archive": extract_archive,
}


def guess_kind(path: Path) -> str:
    """'train' / 'val' for the ILSVRC2012 image tars (by name), else 'archive'."""
    name = Path(path).name
    if name.startswith("ILSVRC2012_img_train") and name.endswith(".tar"):
        return "train"
    if name.startswith("ILSVRC2012_img_val") and name.endswith(".tar"):
        return "val"
    return "archive"


def extract(path: Path, dest_root: Path, kind: str = "auto", *,
            progress: ProgressFn | None = None, workers: int | None = None) -> ExtractResult:
    """Dispatch on `kind` ("auto", or one of EXTRACTORS); `workers` applies to "train"."""
    if kind == "auto":
        kind = guess_kind(path)
    if kind not in EXTRACTORS:
        raise ImagenetError(f"unknown extract kind {kind!r}; valid: auto, "
                            f"{', '.join(EXTRACTORS)}")
    if kind == "train":
        return extract_train(path, dest_root, progress=progress, workers=workers)
    return EXTRACTORS[kind](path, dest_root, progress=progress)
