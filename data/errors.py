"""The error type the libraries raise for bad input, so the command line can print one line,
and the wording of operating-system errors in those lines.

Anything a user can fix (a bad flag, a missing file, a malformed listing line, a corrupt record,
a read-only or full disk) raises ImagenetError with a message that names the file, line or key,
says what is wrong and, where it is not obvious, what to do. Everything else is a bug: the
command line prints one line and writes its traceback to a file (flows/cli.py).

`os_error_message` turns an OSError into such a message: the action and the file, the system's
own words with the errno name (so it can be searched), and what to do for the errnos a user
meets (OS_ERROR_HINTS).
"""
from __future__ import annotations

import errno
import os


class ImagenetError(Exception):
    """A user-facing error: the message alone must tell what is wrong and where."""


# What to do about the errnos that bad paths, permissions and disks produce. An errno missing
# here still gets the file, the system's words and the errno name.
OS_ERROR_HINTS: dict[int, str] = {
    errno.ENOENT: "check the path (relative paths start at the working directory)",
    errno.EACCES: "check the permissions of the path and of its folders, or choose another path",
    errno.EPERM: "the operation is not permitted here; choose another path",
    errno.EROFS: "the file system is read-only; choose an output on a writable one",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another disk",
    errno.EFBIG: "the file is too large for this file system; choose another disk",
    errno.ENOTDIR: "a part of the path is a file where a folder is needed",
    errno.EISDIR: "the path is a folder where a file is needed",
    errno.EEXIST: "something already exists at that path; move it away or choose another path",
    errno.ENOTEMPTY: "the folder is not empty; move it away or choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.ELOOP: "the path has a symbolic link loop",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENOMEM: "out of memory; use smaller inputs or free memory",
    # LMDB reports a short write (what a full disk gives it) as EIO.
    errno.EIO: "the write or read failed; check the free space and the disk",
    errno.EXDEV: "the temporary and final paths are on different file systems",
}


def errno_name(code: int | None) -> str:
    """'ENOSPC' for errno.ENOSPC; '' for None or a code the platform does not name."""
    return errno.errorcode.get(code, "") if code is not None else ""


def os_error_message(err: OSError, action: str = "", path: str | os.PathLike | None = None
                     ) -> str:
    """'<action> <path>: <strerror> (<ERRNO>); <what to do>' for an OSError.

    `path` defaults to the error's own filename; `action` ("cannot write", "cannot read") is
    put in front of it when given.
    """
    where = path if path is not None else err.filename
    if isinstance(where, bytes):
        where = where.decode("utf-8", "replace")
    text = err.strerror or str(err) or type(err).__name__
    name = errno_name(err.errno)
    if name:
        text += f" ({name})"
    if where is not None:
        text = f"{os.fspath(where)}: {text}"
        if path is None and err.filename2 is not None:  # a rename: both names
            text = f"{text} (and {os.fspath(err.filename2)})"
    if action:
        text = f"{action} {text}"
    hint = OS_ERROR_HINTS.get(err.errno)
    return f"{text}; {hint}" if hint else text


def from_os_error(err: OSError, action: str = "", path: str | os.PathLike | None = None
                  ) -> ImagenetError:
    """An ImagenetError worded by os_error_message (raise it `from None`)."""
    return ImagenetError(os_error_message(err, action, path))


def check_path_text(text: str | os.PathLike, what: str) -> None:
    """Refuse a path with a NUL byte (the OS cannot take one; Python raises a bare ValueError)."""
    text = os.fspath(text)
    if "\0" in (text if isinstance(text, str) else text.decode("utf-8", "replace")):
        raise ImagenetError(f"{what} {text!r} contains a NUL byte, which no file name can "
                            "hold; fix the path")
