"""Snapshot files: Caffe's SolverState bytes, the exact-resume side file and its digests, the
'latest complete snapshot' rule, and learned_net resolution (cwd first, like Caffe)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.snapshot import (latest_snapshot, read_side, read_solverstate, resolve_learned_net,
                            snapshot_files, write_snapshot)


def write(tmp_path, it: int, payload: bytes = b"model") -> None:
    hist = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    write_snapshot(prefix="snaps/net", iteration=it, root=tmp_path, caffemodel=payload,
                   history=hist, current_step=2, side={"seed": 5, "train_batches": it})


def test_solverstate_round_trips_with_caffe_fields(tmp_path) -> None:
    write(tmp_path, 30)
    files = snapshot_files("snaps/net", 30, tmp_path)
    state = caffe_pb2.SolverState()
    state.ParseFromString(files.solverstate.read_bytes())
    assert [f.name for f, _ in state.ListFields()] == ["iter", "learned_net", "history",
                                                       "current_step"]
    assert state.learned_net == "snaps/net_iter_30.caffemodel"  # as Caffe builds it
    assert list(state.history[0].shape.dim) == [2, 3] and not state.history[0].HasField("num")
    got = read_solverstate(files.solverstate)
    assert (got.iter, got.current_step) == (30, 2)
    assert np.array_equal(got.history[0], np.arange(6, dtype=np.float32).reshape(2, 3))
    side = read_side(files.solverstate, files.caffemodel)
    assert side["seed"] == 5 and side["train_batches"] == 30


def test_latest_snapshot_skips_incomplete_and_foreign_sets(tmp_path) -> None:
    write(tmp_path, 10)
    write(tmp_path, 20)
    write(tmp_path, 30)
    f30 = snapshot_files("snaps/net", 30, tmp_path)
    f30.side.unlink()  # killed before the side file: not complete
    f20 = snapshot_files("snaps/net", 20, tmp_path)
    f20.caffemodel.write_bytes(b"other")  # a caffemodel the side file does not describe
    assert latest_snapshot("snaps/net", tmp_path).solverstate.name == "net_iter_10.solverstate"
    with pytest.raises(ImagenetError, match="does not belong"):
        read_side(f20.solverstate, f20.caffemodel)
    assert read_side(f30.solverstate) is None  # no side file: Caffe's semantics


def test_no_temporary_files_left_behind(tmp_path) -> None:
    write(tmp_path, 10)
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
        "net_iter_10.caffemodel", "net_iter_10.resume.json", "net_iter_10.solverstate"]
    json.loads((tmp_path / "snaps" / "net_iter_10.resume.json").read_text())


def test_learned_net_resolves_against_cwd_then_beside_the_state(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "m_iter_5.caffemodel").write_bytes(b"x")
    state = tmp_path / "run" / "m_iter_5.solverstate"
    # Caffe opens learned_net relative to the working directory ...
    assert resolve_learned_net("run/m_iter_5.caffemodel", state, tmp_path) == \
        tmp_path / "run" / "m_iter_5.caffemodel"
    # ... we fall back to the solverstate's folder when the pair was moved
    assert resolve_learned_net("old/place/m_iter_5.caffemodel", state, tmp_path / "elsewhere") \
        == tmp_path / "run" / "m_iter_5.caffemodel"
    with pytest.raises(ImagenetError, match="not found"):
        resolve_learned_net("nope.caffemodel", state, tmp_path)


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_every_state_a_kill_leaves_resumes_exactly_or_is_not_offered(tmp_path, monkeypatch,
                                                                     kill_after) -> None:
    """A kill after 0, 1 or 2 of the three renames (side file, caffemodel, solverstate): a
    .solverstate that exists always has its side file (so it resumes exactly), and
    latest_snapshot never offers the unfinished one; its temporaries are swept by the next run."""
    import os

    import data.atomic
    import model.snapshot as snap

    write(tmp_path, 10)
    real_replace, renames = os.replace, []

    def replace_then_die(src, dst):
        if len(renames) == kill_after:
            raise KeyboardInterrupt("killed")  # stands in for SIGKILL between the renames
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(data.atomic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 20, payload=b"model 20")
    monkeypatch.setattr(data.atomic.os, "replace", real_replace)
    f20 = snapshot_files("snaps/net", 20, tmp_path)
    assert [p.name for p in renames] == ["net_iter_20.resume.json", "net_iter_20.caffemodel"][
        :kill_after]
    assert not f20.solverstate.exists()  # written last: never there without the other two
    assert latest_snapshot("snaps/net", tmp_path).solverstate.name == "net_iter_10.solverstate"
    # A real kill leaves the temporary of the file being written; the next run removes it.
    stale = tmp_path / "snaps" / ".net_iter_20.solverstate.999999999-0123abcd.tmp"
    stale.write_bytes(b"partial")
    assert snap.remove_snapshot_temps("snaps/net", tmp_path) == [stale]
    assert not stale.exists()
