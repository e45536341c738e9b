"""Training snapshots: Caffe's `.caffemodel` + `.solverstate` pair and our exact-resume side file.

Caffe (src/caffe/solver.cpp Snapshot, sgd_solver.cpp SnapshotSolverStateToBinaryProto) writes
`<snapshot_prefix>_iter_<N>.caffemodel` (the TRAIN net as a binary NetParameter) and
`<snapshot_prefix>_iter_<N>.solverstate` (SolverState: iter, learned_net = the caffemodel's
file name as built from the prefix, history = one BlobProto per history blob with a new-style
shape, current_step). We write the same bytes Caffe would, so real Caffe resumes from ours.

Caffe keeps no RNG state or data position, so its resume is not the interrupted run
(BVLC/caffe#1059). What exact resume needs goes into `<prefix>_iter_<N>.resume.json`, which
Caffe never reads: seed, data batches consumed, test-net cursors, the smoothed-loss window, and
the SHA-256 of the caffemodel and solverstate it belongs to.

Every state a kill can leave on disk resumes exactly. Each file is written to a temporary name
and renamed (data/atomic.py), in this order: the side file (its digests are of the bytes about
to be written), the caffemodel, the `.solverstate` LAST. So a `.solverstate` that exists always
has its side file beside it (a kill between the files leaves a side file and maybe a caffemodel,
which nothing offers for resuming); a `.solverstate` without a side file is one real Caffe
wrote (or one whose side file was deleted), resumed with Caffe's semantics. A snapshot counts as
complete (and is offered by `latest_snapshot`) only when all three exist and the digests match.
`remove_snapshot_temps` deletes the temporaries a killed writer left; the Solver calls it when
a run starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.atomic import probe_writable, remove_stale_temps, write_bytes_atomic
from data.datum import array_to_blobproto, blobproto_to_array, read_proto_file
from data.errors import ImagenetError, from_os_error, os_error_message
from data.proto import caffe_pb2

CAFFEMODEL_SUFFIX = ".caffemodel"
SOLVERSTATE_SUFFIX = ".solverstate"
SIDE_SUFFIX = ".resume.json"
SIDE_FORMAT = "imagenet-pipeline resume v2"
# v1 side files predate the per-image crop/mirror draws (data/transform.py TransformPlan.draw,
# commit 5acf33f): they still resume weights, history and data position, but the random crops and
# mirrors after the resume point are not the ones the interrupted run would have drawn.
OLDER_SIDE_FORMATS: dict[str, str] = {
    "imagenet-pipeline resume v1": "written before crops and mirrors were drawn per image, so "
    "the crops and mirrors after the resume point differ from the interrupted run's",
}


@dataclass(frozen=True)
class SolverStateData:
    """A parsed .solverstate."""

    iter: int
    learned_net: str
    history: list[np.ndarray]
    current_step: int


def snapshot_stem(prefix: str, iteration: int) -> str:
    """Solver::SnapshotFilename without extension: prefix + "_iter_" + format_int(iter)."""
    return f"{prefix}_iter_{int(iteration)}"


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path: str | Path) -> str:
    return _sha256(Path(path).read_bytes())


def solverstate_bytes(iteration: int, learned_net: str, history: Sequence[np.ndarray],
                      current_step: int) -> bytes:
    """SolverState as SGDSolver::SnapshotSolverStateToBinaryProto serializes it."""
    state = caffe_pb2.SolverState()
    state.iter = int(iteration)
    state.learned_net = learned_net
    for h in history:
        state.history.append(array_to_blobproto(np.asarray(h, np.float32), legacy_4d=False))
    state.current_step = int(current_step)
    return state.SerializeToString()


def read_solverstate(path: str | Path) -> SolverStateData:
    """Parse a .solverstate written by Caffe or by us. SGDSolver writes iter, learned_net, the
    history blobs and current_step in that order, every one of them always: a file missing one
    is empty or was cut short (a cut between fields still parses) and is refused."""
    state = read_proto_file(path, caffe_pb2.SolverState(), "solverstate", "SolverState")
    if state.ByteSize() == 0:
        raise ImagenetError(f"{path}: empty solverstate (0 bytes): was it cut short or never "
                            "written? resume from a complete snapshot")
    absent = [f for f in ("iter", "learned_net", "current_step") if not state.HasField(f)]
    if absent:
        raise ImagenetError(f"{path}: the solverstate has no {' or '.join(absent)} (Caffe "
                            "always writes them): it was cut short; resume from a complete "
                            "snapshot")
    history = []
    for i, bp in enumerate(state.history):
        try:
            history.append(blobproto_to_array(bp))
        except ImagenetError as exc:
            raise ImagenetError(f"{path}: history blob {i}: {exc}") from None
    return SolverStateData(iter=int(state.iter), learned_net=state.learned_net,
                           history=history, current_step=int(state.current_step))


def resolve_learned_net(learned_net: str, solverstate: str | Path, cwd: str | Path) -> Path:
    """Caffe opens learned_net relative to the working directory; we fall back to the
    solverstate's folder so a moved snapshot pair still resumes."""
    candidates = [Path(cwd) / learned_net, Path(solverstate).parent / Path(learned_net).name]
    for c in candidates:
        if c.exists():
            return c
    raise ImagenetError(f"{solverstate}: learned_net {learned_net!r} not found (looked at "
                        f"{', '.join(str(c) for c in candidates)})")


@dataclass(frozen=True)
class SnapshotFiles:
    caffemodel: Path
    solverstate: Path
    side: Path


def snapshot_files(prefix: str, iteration: int, root: str | Path = ".") -> SnapshotFiles:
    stem = Path(root) / snapshot_stem(prefix, iteration)
    return SnapshotFiles(caffemodel=stem.with_name(stem.name + CAFFEMODEL_SUFFIX),
                         solverstate=stem.with_name(stem.name + SOLVERSTATE_SUFFIX),
                         side=stem.with_name(stem.name + SIDE_SUFFIX))


def write_snapshot(*, prefix: str, iteration: int, root: str | Path, caffemodel: bytes,
                   history: Sequence[np.ndarray], current_step: int, side: dict[str, Any],
                   log=None) -> SnapshotFiles:
    """Write the three files of snapshot `iteration`: the side file (with the digests of the
    other two) first, the caffemodel, then the `.solverstate` last (see the module docstring).

    `caffemodel` is the serialized NetParameter; `side` the resume information (JSON-able).
    """
    files = snapshot_files(prefix, iteration, root)
    try:
        files.caffemodel.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise from_os_error(err, "cannot create the snapshot folder",
                            files.caffemodel.parent) from None
    stem = snapshot_stem(prefix, iteration)
    # learned_net as Caffe writes it: the model file name built from the prefix, not absolute
    state = solverstate_bytes(iteration, stem + CAFFEMODEL_SUFFIX, history, current_step)
    record = {"format": SIDE_FORMAT, "iter": int(iteration), **side,
              "caffemodel_sha256": _sha256(caffemodel), "solverstate_sha256": _sha256(state)}
    write_bytes_atomic(files.side, (json.dumps(record, indent=1) + "\n").encode())
    if log:
        log(f"Snapshotting to binary proto file {stem}{CAFFEMODEL_SUFFIX}")
    write_bytes_atomic(files.caffemodel, caffemodel)
    if log:
        log(f"Snapshotting solver state to binary proto file {stem}{SOLVERSTATE_SUFFIX}")
    write_bytes_atomic(files.solverstate, state)
    return files


def check_snapshot_folder(prefix: Path, given: str) -> None:
    """Fail now, before any training, if snapshots of `prefix` could not be written where it
    points (Caffe finds out at the first snapshot, losing the training before it). The folder
    is not created here (write_snapshot does that): data.atomic.probe_writable tries it, or
    the nearest folder above it that exists. `given` is the snapshot_prefix as the solver
    spells it."""
    folder = prefix.parent
    try:
        probe_writable(folder, f"{prefix.name}_probe")  # named to be swept with the snapshots
    except NotADirectoryError as err:
        raise ImagenetError(f"snapshot_prefix {given!r}: cannot create the snapshot folder "
                            f"{folder}: {err.filename} is a file; choose another "
                            "snapshot_prefix") from None
    except OSError as err:
        raise ImagenetError(f"snapshot_prefix {given!r}: " + os_error_message(
            err, "snapshots cannot be written in", err.filename or folder)) from None


def remove_snapshot_temps(prefix: str, root: str | Path = ".") -> list[Path]:
    """Delete the temporary files that killed writers of `prefix`'s files (snapshots, and the
    metrics and plot beside them) left behind; never those of a writer that still runs."""
    base = Path(root) / prefix
    return remove_stale_temps(base.parent, base.name + "_")


def read_side(solverstate: str | Path, caffemodel: str | Path | None = None
              ) -> dict[str, Any] | None:
    """The resume side file of a solverstate, or None when there is none (a Caffe-written
    snapshot). A side file that does not belong to these exact files is an error: resuming
    with it would silently not be the interrupted run."""
    ss = Path(solverstate)
    name = ss.name[:-len(SOLVERSTATE_SUFFIX)] if ss.name.endswith(SOLVERSTATE_SUFFIX) else ss.name
    side_path = ss.with_name(name + SIDE_SUFFIX)
    if not side_path.exists():
        return None
    try:
        record = json.loads(side_path.read_text())
    except (OSError, ValueError) as exc:
        raise ImagenetError(f"{side_path}: unreadable resume file: {exc}") from None
    fmt = record.get("format")
    if fmt != SIDE_FORMAT and fmt not in OLDER_SIDE_FORMATS:
        raise ImagenetError(f"{side_path}: format {fmt!r}, expected {SIDE_FORMAT!r}; delete "
                            "the side file to resume with Caffe's semantics")
    if record.get("solverstate_sha256") != file_sha256(ss):
        raise ImagenetError(f"{side_path} does not belong to {ss} (solverstate digest differs); "
                            "delete the side file to resume with Caffe's semantics")
    if caffemodel is not None and record.get("caffemodel_sha256") != file_sha256(caffemodel):
        raise ImagenetError(f"{side_path} does not belong to {caffemodel} (caffemodel digest "
                            "differs)")
    return record


_ITER_RE = re.compile(r"_iter_(\d+)\.resume\.json$")


def side_format_caveat(record: dict[str, Any]) -> str | None:
    """Why a side file of an older format does not resume exactly, or None when it does."""
    return OLDER_SIDE_FORMATS.get(record.get("format", ""))


def latest_snapshot(prefix: str, root: str | Path = ".") -> SnapshotFiles | None:
    """The highest-iteration COMPLETE snapshot of `prefix` (all three files, digests match)."""
    base = Path(root) / prefix
    found = []
    for side in base.parent.glob(base.name + "_iter_*" + SIDE_SUFFIX):
        m = _ITER_RE.search(side.name)
        if m and side.name == f"{base.name}_iter_{m.group(1)}{SIDE_SUFFIX}":
            found.append(int(m.group(1)))
    for it in sorted(found, reverse=True):
        files = snapshot_files(prefix, it, root)
        if not (files.caffemodel.exists() and files.solverstate.exists()):
            continue
        try:
            read_side(files.solverstate, files.caffemodel)
        except ImagenetError:
            continue
        return files
    return None
