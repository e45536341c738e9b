"""Where a run starts from: a snapshot to resume (--snapshot), weights to finetune from
(--weights), the seed, and the data position that Caffe loses on resume and we keep.

`read_resume_point` reads the .solverstate, its learned_net and our side file
(model/snapshot.py) before the nets are built, because the side file fixes the seed (fillers,
data order). `DataPosition` is the host bookkeeping of Solver::Step kept in the side file:
batches consumed by each net and UpdateSmoothedLoss's window. Resuming from a Caffe-written
solverstate (no side file) restarts the data readers as Caffe does (BVLC/caffe#1059).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model import snapshot as snap
from model.caffemodel import load_caffemodel


def weights_paths(spec: str | Sequence[str], root: Path) -> list[Path]:
    """--weights: comma-separated .caffemodel files, relative ones against `root`."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    return [Path(n) if Path(n).is_absolute() else root / n
            for n in (n.strip() for n in names) if n]


def load_weights(spec: str | Sequence[str], root: Path) -> list[dict[str, list[np.ndarray]]]:
    """The weights of every file in --weights (weights_paths), in order."""
    return [load_caffemodel(p) for p in weights_paths(spec, root)]


@dataclass(frozen=True)
class ResumePoint:
    """A snapshot to resume from, read before the nets are built: its side file fixes the
    seed, which the fillers and the data order depend on."""

    given: str          # the --snapshot argument, as logged
    solverstate: Path
    state: snap.SolverStateData
    caffemodel: Path
    side: dict[str, Any] | None  # None: written by real Caffe (no exact-resume record)


def read_resume_point(snapshot: str | os.PathLike, root: Path, n_devices: int,
                      processes: int = 1) -> ResumePoint:
    """The .solverstate, its learned_net and our side file; refuses a side file written with
    another device count (the global batch, hence the data order, would differ) or another
    process count."""
    path = Path(snapshot)
    if not path.is_absolute() and not path.exists():
        path = root / path
    state = snap.read_solverstate(path)
    if not state.learned_net:
        raise ImagenetError(f"{path}: no learned_net (HDF5 snapshots are not supported)")
    learned = snap.resolve_learned_net(state.learned_net, path, root)
    side = snap.read_side(path, learned)
    if side is not None and side.get("processes", 1) != processes:
        raise ImagenetError(f"{path} was written by a {side.get('processes', 1)}-process run; "
                            f"resume it with --num_processes={side.get('processes', 1)} (got "
                            f"{processes}): every process reads its share of each batch")
    if side is not None and side.get("devices", n_devices) != n_devices:
        raise ImagenetError(f"{path} was written by a {side['devices']}-device run; "
                            f"resume it on {side['devices']} devices (got {n_devices}) so the "
                            "global batch and data order stay the same")
    return ResumePoint(given=str(snapshot), solverstate=path, state=state, caffemodel=learned,
                       side=side)


def choose_seed(param: caffe_pb2.SolverParameter, resume: ResumePoint | None) -> int:
    """The run's seed: the resumed run's, else random_seed, else random (Caffe's default -1)."""
    if resume is not None and resume.side is not None:
        return int(resume.side["seed"])
    if param.random_seed >= 0:
        return int(param.random_seed)
    return int.from_bytes(os.urandom(4), "little")


@dataclass
class DataPosition:
    """Host bookkeeping of Solver::Step that Caffe loses on resume and we keep (side file):
    batches consumed by the train net and each test net, and UpdateSmoothedLoss's window."""

    train_batches: int = 0
    test_batches: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: np.float32 = field(default_factory=lambda: np.float32(0))
    start_iter: int = 0  # where the smoothing window's ring index counts from

    @classmethod
    def from_side(cls, side: dict[str, Any] | None, n_tests: int, iteration: int
                  ) -> "DataPosition":
        """The position a resumed run continues from; without a side file (a Caffe-written
        solverstate) every reader restarts and the window is empty, as in Caffe."""
        if side is None:
            return cls(test_batches=[0] * n_tests, start_iter=iteration)
        return cls(train_batches=int(side["train_batches"]),
                   test_batches=[int(c) for c in side["test_batches"]],
                   losses=[float(x) for x in side["losses"]],
                   smoothed=np.float32(side["smoothed_loss"]), start_iter=int(side["start_iter"]))

    def side_record(self, *, seed: int, devices: int, iter_size: int, processes: int
                    ) -> dict[str, Any]:
        """The side file's record (model/snapshot.py writes it beside the .solverstate)."""
        return {"seed": seed, "devices": devices,
                "train_batches": self.train_batches, "test_batches": list(self.test_batches),
                "losses": [float(x) for x in self.losses], "smoothed_loss": float(self.smoothed),
                "start_iter": self.start_iter, "iter_size": iter_size,
                # absent: one process (side files of single-process runs stay as they were)
                **({"processes": processes} if processes > 1 else {})}
