"""The training input path (model/feed.py DeviceFeed over data/pipeline.py's Prefetcher): the
worker count changes nothing a run computes, nor what a resume sees; a batch's error reaches the
step that needed it, not an earlier one."""
from __future__ import annotations

import numpy as np
import pytest

from data.errors import ImagenetError
from data.pipeline import BatchSource, HostBatch, default_workers
from model.caffemodel import load_caffemodel
from model.feed import DeviceFeed, FedNet
from test_train_tiny import SOLVER, make_tiny

# iter_size 2: each step takes two batches per Data layer; a test net with its own cursor.
FEED_SOLVER = SOLVER.replace("snapshot: 0", "snapshot: 4") + (
    "iter_size: 2\ntest_iter: 3\ntest_interval: 4\n")


def test_the_worker_count_changes_nothing_a_run_computes_or_resumes(tmp_path) -> None:
    from model.train import train
    runs = {}
    for workers in (1, 3):
        run = make_tiny(tmp_path / f"w{workers}", solver=FEED_SOLVER)
        runs[workers] = (run, train("solver.prototxt", workdir=run, log=lambda l: None,
                                    workers=workers))
    (one_dir, one), (three_dir, three) = runs[1], runs[3]
    assert one.losses == three.losses and len(one.losses) == 11  # 10 steps + final forward
    assert one.final_test_outputs == three.final_test_outputs
    a, b = load_caffemodel(one_dir / "tiny_iter_10.caffemodel"), \
        load_caffemodel(three_dir / "tiny_iter_10.caffemodel")
    assert all(np.array_equal(x, y) for layer in a for x, y in zip(a[layer], b[layer]))
    assert one.train_seconds > 0 and 0 <= one.input_wait_seconds <= one.train_seconds
    # a resume on another worker count continues exactly where the run was
    resumed = train("solver.prototxt", workdir=three_dir, log=lambda l: None, workers=2,
                    snapshot="tiny_iter_4.solverstate")
    assert {i: v for i, v in resumed.losses.items()} == \
        {i: v for i, v in one.losses.items() if i >= 4}
    c = load_caffemodel(three_dir / "tiny_iter_10.caffemodel")
    assert all(np.array_equal(x, y) for layer in a for x, y in zip(a[layer], c[layer]))


class Counting(BatchSource):
    """A stub source: batch i is filled with i; batch `bad` raises, as a bad label would."""

    def __init__(self, bad: int) -> None:
        self.name, self.tops, self.batch_size, self.bad = "stub", ("data",), 2, bad
        self.built: list[int] = []

    def __len__(self) -> int:
        return 1000

    def batch(self, index: int) -> HostBatch:
        self.built.append(index)
        if index == self.bad:
            raise ImagenetError(f"stub: a bad label in batch {index}")
        return HostBatch(index=index, images=np.full((2, 1, 1, 1), index, np.uint8),
                         offsets=np.zeros((2, 2), np.int32), mirror=np.zeros(2, bool),
                         labels=np.zeros(2, np.float32), wrapped=False)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("workers", [1, 4])
def test_device_feed_keeps_the_order_and_raises_at_the_step_that_needs_the_bad_batch(workers):
    src = Counting(bad=9)
    fed = FedNet(net=None, sources={"stub": src}, means={}, loss_weight={})  # type: ignore
    put_threads = []

    def put(stacked):
        import threading
        put_threads.append(threading.current_thread().name)
        return stacked

    feed = DeviceFeed(fed, 3, 2, put, prefetch=4, workers=workers)
    try:
        for step in range(3):  # batches 3,4 / 5,6 / 7,8
            arrays, wrapped, waited = feed.next()
            assert arrays["stub"]["images"][:, 0, 0, 0, 0].tolist() == [3 + 2 * step,
                                                                         4 + 2 * step]
            assert not wrapped and waited >= 0
        with pytest.raises(ImagenetError, match="bad label in batch 9"):
            feed.next()
    finally:
        feed.close()
    assert set(put_threads) == {"device-feed"}  # assembly and transfer off the main thread


def test_default_workers_are_this_process_cores() -> None:
    import os
    assert default_workers() == len(os.sched_getaffinity(0))
