"""data/host.py: worker processes of the data stages end with the process that started them.

A forkserver pool's workers are the forkserver's children and hold the pipe that tells the
forkserver its owner is gone, so a SIGKILLed extraction left the forkserver, its resource
tracker and the workers alive forever (found by the deploy kill campaign). Here the owner is
SIGKILLed with its pool in use and every process it started must be gone within seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data.extract import extract_train
from data.host import exit_with

REPO = Path(__file__).resolve().parents[2]

# Each script prints GO once its pool's workers exist and have done some work, then sleeps.
EXTRACT = """
import sys, time
from data.extract import extract_train
def progress(done, total):  # called in this process when a worker has finished a synset
    print("GO", flush=True)
    time.sleep(300)
extract_train(sys.argv[1], sys.argv[2], progress=progress, workers=2)
"""
CONVERT = """
import sys, time
from data import convert
ordered = convert._ordered_parallel
def stall(*args, **kwargs):
    for i, outcome in enumerate(ordered(*args, **kwargs)):
        if i == 2:
            print("GO", flush=True)
            time.sleep(300)
        yield outcome
convert._ordered_parallel = stall
convert.CHUNK_SIZE = 1
convert.convert_imageset(sys.argv[1], sys.argv[1] + "/list.txt", sys.argv[2] + "/db",
                         workers=2, pool="process")
"""


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _kill_owner_then_wait(args: list[str]) -> tuple[set[int], list[int]]:
    owner = subprocess.Popen([sys.executable, "-c", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout.readline().strip() == "GO"
        started = _descendants(owner.pid)
    finally:
        owner.kill()
        owner.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(_alive, started)):
        time.sleep(0.1)
    left = [pid for pid in started if _alive(pid)]
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return started, left


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("pool", ["extract", "convert"])
def test_a_killed_owner_leaves_no_worker_process(pool, mini_tiny, tmp_path):
    if pool == "extract":
        args = [EXTRACT, str(mini_tiny.train_tar), str(tmp_path)]
    else:
        extract_train(mini_tiny.train_tar, tmp_path / "tree", workers=1)
        images = sorted((tmp_path / "tree" / "train").rglob("*.JPEG"))
        assert len(images) >= 6
        (tmp_path / "tree" / "train" / "list.txt").write_text("".join(
            f"{p.parent.name}/{p.name} {i % 3}\n" for i, p in enumerate(images)))
        (tmp_path / "out").mkdir()
        args = [CONVERT, str(tmp_path / "tree" / "train"), str(tmp_path / "out")]
    started, left = _kill_owner_then_wait(args)
    # the two workers and the forkserver at least (and its resource tracker)
    assert len(started) >= 3, started
    assert left == [], f"still running 15 s after their owner was SIGKILLed: {left}"


def test_exit_with_a_process_already_gone_exits_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = subprocess.run(
        [sys.executable, "-c", f"from data.host import exit_with; exit_with({gone.pid}); "
         "import time; time.sleep(30)"], cwd=REPO, timeout=20)
    assert worker.returncode == 1


def test_exit_with_a_live_owner_keeps_running():
    exit_with(os.getpid())  # this process: the watcher waits, nothing happens
    time.sleep(0.2)
    assert any(t.name == f"exit-with-{os.getpid()}" for t in threading.enumerate())
