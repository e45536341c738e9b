"""The ILSVRC2012 devkit's `data/meta.mat`, read and written with scipy.io.

The devkit ships its synset table only as meta.mat: a MAT v5 file (MATLAB's default `save -v7`,
zlib-compressed) holding one N x 1 struct array `synsets` with the fields ILSVRC2012_ID, WNID,
words, gloss, num_children, children, wordnet_height and num_train_images. The 1000 classes are
the leaves (num_children == 0); the validation ground truth holds their ILSVRC2012_IDs.

scipy.io.loadmat parses the file in a child Python process: on corrupt input scipy's compiled
MAT reader can die with SIGSEGV/SIGBUS instead of raising (measured: 35 of ~3,800 single-byte
corruptions of an uncompressed file; scipy/scipy#6072 is the same class), and a corrupt devkit
must be one error line, never a dead flow. The child costs ~0.5 s once per listings stage.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import ImagenetError

META_VARIABLE = "synsets"
# Fields every synset must have (the rest of the devkit's fields are carried but not read).
ID_FIELD, WNID_FIELD, WORDS_FIELD, CHILDREN_FIELD = (
    "ILSVRC2012_ID", "WNID", "words", "num_children")
# Written into the 116-byte MAT header text in place of scipy's "Created on: <time>", so the same
# synsets always give the same bytes (the mini devkit's MD5SUMS depend on it).
HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by: imagenet-pipeline"
HEADER_TEXT_BYTES = 116
# The reader child: its whole budget (a 2 MB meta.mat parses in well under a second).
CHILD_TIMEOUT_S = 300
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class DevkitSynset:
    """One row of meta.mat's `synsets`: a class when num_children == 0, else a WordNet node."""

    ilsvrc2012_id: int
    wnid: str
    words: str
    num_children: int


def read_meta(data: bytes, where: str) -> list[DevkitSynset]:
    """The synsets of a meta.mat held in `data` (`where` names it in errors), in file order.
    Anything but a readable MAT v5/v7 file with a `synsets` struct array of the devkit's fields
    is an ImagenetError naming `where`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "data.devkit_meta", where], input=data,
                              env=env, capture_output=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ImagenetError(f"{where}: reading it took over {CHILD_TIMEOUT_S} s; the MAT-file "
                            "is corrupt or not the devkit's meta.mat") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise ImagenetError(f"{where}: corrupt MAT-file (scipy.io's reader died with {name} on "
                            "it); download the devkit again")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ImagenetError(f"{where}: the meta.mat reader failed (exit {done.returncode}: "
                            f"{tail[0]})") from None
    if "error" in answer:
        raise ImagenetError(answer["error"])
    return [DevkitSynset(*row) for row in answer["synsets"]]


def _parse(data: bytes, where: str) -> list[DevkitSynset]:
    """What read_meta returns, parsed in this process (the child's side)."""
    import scipy.io
    from scipy.io.matlab import MatReadError, matfile_version

    def bad(what: str) -> ImagenetError:
        return ImagenetError(f"{where}: {what}")

    try:
        major, _ = matfile_version(io.BytesIO(data))
    except (ValueError, MatReadError, IndexError) as err:
        raise bad(f"not a MAT-file ({err})") from None
    if major == 2:
        raise bad("MAT v7.3 (HDF5) file; re-save it with `save -v7` or give the devkit a plain-"
                  "text data/ILSVRC2012_mapping.txt ('<ILSVRC2012_ID> <WNID> <words>' per line)")
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=[META_VARIABLE])
    # Measured on damaged files: ValueError, TypeError, OSError, IndexError, zlib.error,
    # MatReadError, UnicodeDecodeError, ZeroDivisionError, UnboundLocalError, MemoryError.
    except Exception as err:
        raise bad(f"truncated or corrupt MAT-file ({type(err).__name__}: {err})") from None
    synsets = mat.get(META_VARIABLE)
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    missing = [f for f in (ID_FIELD, WNID_FIELD) if f not in names]
    if synsets is None or synsets.size == 0 or missing:
        raise bad(f"no '{META_VARIABLE}' struct array with fields {ID_FIELD} and {WNID_FIELD}")
    out = []
    for i, row in enumerate(synsets.ravel(order="F"), 1):
        def number(field: str, default: float | None = None) -> int:
            if field not in names:
                return int(default)
            value = np.asarray(row[field])
            if value.size != 1 or value.dtype.kind not in "iuf" or value.ravel()[0] % 1:
                raise bad(f"{META_VARIABLE}({i}).{field} is not one integer: {value!r}")
            return int(value.ravel()[0])

        def text(field: str) -> str:
            value = np.asarray(row[field]) if field in names else np.array([], "U1")
            if value.dtype.kind != "U" or value.ndim > 1 and value.shape[0] > 1:
                raise bad(f"{META_VARIABLE}({i}).{field} is not a text row: {value!r}")
            return "".join(value.ravel())

        out.append(DevkitSynset(number(ID_FIELD), text(WNID_FIELD), text(WORDS_FIELD),
                                number(CHILDREN_FIELD, 0)))
    return out


def format_meta(synsets: list[dict[str, Any]]) -> bytes:
    """A meta.mat (MAT v5, compressed like MATLAB's `save -v7`) holding `synsets` as an N x 1
    struct array: each dict maps field -> str, number, or list of numbers (a 1 x n row), and all
    have the same fields in the same order. The bytes depend only on `synsets`."""
    import scipy.io

    fields = list(synsets[0]) if synsets else []
    table = np.empty((len(synsets), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(synsets):
        if list(row) != fields:
            raise ValueError(f"synset {i}: fields {list(row)} differ from {fields}")
        for field, value in row.items():
            if isinstance(value, (list, tuple)):
                value = np.asarray(value, dtype=np.float64).reshape(1, -1)
            table[i, 0][field] = value
    buf = io.BytesIO()
    scipy.io.savemat(buf, {META_VARIABLE: table}, do_compression=True)
    out = bytearray(buf.getvalue())
    out[:HEADER_TEXT_BYTES] = HEADER_TEXT.ljust(HEADER_TEXT_BYTES, b" ")
    return bytes(out)


def _child_main(argv: list[str]) -> int:
    """`python -m data.devkit_meta WHERE` < meta.mat: one JSON object on stdout, {"synsets": rows}
    or {"error": message}."""
    where = argv[0] if argv else "meta.mat"
    try:
        rows = [[s.ilsvrc2012_id, s.wnid, s.words, s.num_children]
                for s in _parse(sys.stdin.buffer.read(), where)]
        answer: dict[str, Any] = {"synsets": rows}
    except ImagenetError as err:
        answer = {"error": str(err)}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
