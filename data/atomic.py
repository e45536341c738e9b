"""Atomic file writes, and the sweep of what killed writers left behind.

A file is written under a temporary name beside its target and renamed over it, so a kill
never leaves a half-written file under the real name. The temporary name carries the writer's
pid (`.<name>.<pid>-<random>.tmp`): `remove_stale_temps` deletes those of writers that no
longer run, while a writer still running (another process writing the same folder) keeps its
file. Every writer here (write_bytes_atomic, open_atomic, symlink_atomic) sweeps the stale
temporaries of its target before it writes, so the rerun after a kill leaves nothing behind:
every atomic writer of the project goes through these.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from data.errors import from_os_error

TMP_SUFFIX = ".tmp"
# .<target name>.<pid>-<8 hex><TMP_SUFFIX>
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
_FILE_MODE = 0o644


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0; one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path` that remove_stale_temps recognises."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_bytes_atomic(path: str | os.PathLike, payload: bytes, *, durable: bool = True) -> None:
    """Write `payload` to a temporary file beside `path`, fsync it (when `durable`), rename it
    over `path`. On any failure the temporary is removed and `path` is as it was; an OSError
    (read-only or full disk, missing folder) is raised as an ImagenetError naming `path`."""
    with open_atomic(path, durable=durable) as fh:
        fh.write(payload)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to stream `path`'s content into: written under a temporary name (after
    sweeping the temporaries killed writers of `path` left), fsynced when `durable`, renamed
    over `path` when the block ends normally, removed when it raises. An OSError is raised as
    an ImagenetError naming `path`."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only disk refuses even this unlink
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise from_os_error(err, "cannot write", path) from None
        raise


def symlink_atomic(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make `link` a symbolic link to `target`, replacing what is there in one rename."""
    link = Path(link)
    remove_stale_temps(link.parent, link.name)
    tmp = temp_path(link)
    try:
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise from_os_error(err, "cannot create the link", link) from None
        raise


def probe_writable(folder: str | os.PathLike, name: str = "probe") -> Path:
    """Create and remove a file in `folder`, or in the nearest folder above it that exists
    (the missing ones would be created there): the one test of writability that holds for
    root, ACLs and read-only mounts alike, which permission bits do not. Returns the folder
    probed; raises OSError naming that folder (NotADirectoryError naming the file that stands
    in the way). The probe is
    named like a temporary (temp_path), so a kill in between leaves what the sweep removes."""
    probe_in = Path(folder)
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_in))
    probe = temp_path(probe_in / name)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
        os.unlink(probe)
    except OSError as err:  # named by the folder: the probe's own name means nothing to anyone
        raise OSError(err.errno, err.strerror, str(probe_in)) from None
    return probe_in


def remove_stale_temps(folder: str | os.PathLike, name_prefix: str = "") -> list[Path]:
    """Delete the temporary files of dead writers in `folder` whose target name starts with
    `name_prefix`; returns what was removed."""
    removed: list[Path] = []
    try:
        names = os.listdir(folder)  # names only: cheap beside a folder of many files
    except OSError:
        return removed  # nothing to sweep where nothing can be listed
    for name in names:
        if not name.endswith(TMP_SUFFIX) or not name.startswith("."):
            continue
        m = _TMP_RE.match(name)
        if m is None or not m.group("name").startswith(name_prefix):
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not pid_alive(pid):
            entry = Path(folder) / name
            try:
                entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed
