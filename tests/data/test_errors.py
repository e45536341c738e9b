"""data/errors.py: how OS errors are worded in the one-line messages (file, the system's words,
the errno name, what to do), and the NUL-byte path check."""
from __future__ import annotations

import errno
import os

import pytest

from data.errors import ImagenetError, check_path_text, os_error_message


@pytest.mark.parametrize("code, hint", [
    (errno.EACCES, "check the permissions"),
    (errno.EROFS, "read-only; choose an output on a writable one"),
    (errno.ENOSPC, "the disk is full"),
    (errno.ENOENT, "check the path"),
])
def test_os_errors_name_the_file_the_errno_and_what_to_do(code, hint) -> None:
    err = OSError(code, os.strerror(code), "/data/out/mean.binaryproto")
    text = os_error_message(err, "cannot write")
    assert text.startswith(f"cannot write /data/out/mean.binaryproto: {os.strerror(code)} "
                           f"({errno.errorcode[code]}); ")
    assert hint in text and "\n" not in text


def test_the_target_replaces_a_temporary_name_and_renames_name_both() -> None:
    err = OSError(errno.EROFS, "Read-only file system", "/ro/.mean.1-abcd.tmp")
    assert os_error_message(err, "cannot write", "/ro/mean").startswith(
        "cannot write /ro/mean: Read-only file system (EROFS)")
    rename = OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/x")
    assert "/a/x: Invalid cross-device link (EXDEV) (and /b/x)" in os_error_message(rename)


def test_nul_in_a_path_is_refused() -> None:
    check_path_text("fine/path.txt", "listing")
    with pytest.raises(ImagenetError, match=r"listing 'a\\x00b' contains a NUL byte"):
        check_path_text("a\0b", "listing")
