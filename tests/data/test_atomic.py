"""data/atomic.py: atomic writes, and the sweep of the temporaries killed writers left."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.atomic import (open_atomic, probe_writable, remove_stale_temps, symlink_atomic,
                         temp_path, write_bytes_atomic)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _leftover(target: Path, pid: int) -> Path:
    """What a writer of `target` killed mid-write leaves: its temporary, under its pid."""
    name = temp_path(target).name.replace(f".{os.getpid()}-", f".{pid}-")
    leftover = target.with_name(name)
    leftover.write_bytes(b"half")
    return leftover


@pytest.mark.parametrize("writer", ["write_bytes_atomic", "open_atomic", "symlink_atomic"])
def test_every_writer_sweeps_what_a_killed_writer_left(writer, tmp_path):
    target = tmp_path / "out.bin"
    dead = _leftover(target, _dead_pid())
    alive = _leftover(target, os.getppid())  # a writer that still runs keeps its file
    other = _leftover(tmp_path / "elsewhere.bin", _dead_pid())  # another target's: left
    if writer == "write_bytes_atomic":
        write_bytes_atomic(target, b"data")
    elif writer == "open_atomic":
        with open_atomic(target) as fh:
            fh.write(b"data")
    else:
        symlink_atomic(target, "somewhere")
    assert not dead.exists() and alive.exists() and other.exists()
    assert target.is_symlink() if writer == "symlink_atomic" else target.read_bytes() == b"data"
    assert remove_stale_temps(tmp_path) == [other]


def test_a_failed_stream_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with open_atomic(target) as fh:
            fh.write(b"half")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_probe_names_the_folder_and_leaves_nothing(tmp_path):
    assert probe_writable(tmp_path / "not" / "yet") == tmp_path
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as err:
        probe_writable(tmp_path / "file" / "sub")
    assert err.value.filename == str(tmp_path / "file")
