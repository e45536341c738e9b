"""tasks/eta.py: test passes counted as Caffe's Solver schedules them, rates from timestamps,
the time left with tests included, and an estimate from the test speed before any training."""
from __future__ import annotations

import pytest

from tasks.eta import Schedule, TrainingClock, duration

ALEXNET = Schedule(max_iter=450_000, test_interval=1000, test_batches=1000,
                   test_initialization=True, train_images_per_iter=256, test_batch_size=50)
MINI = Schedule(max_iter=300, test_interval=100, test_batches=8, test_initialization=True,
                train_images_per_iter=32, test_batch_size=25)


def test_test_passes_follow_solver_step():
    assert MINI.test_passes(0, 300) == 4                     # 0, 100, 200, 300
    assert MINI.test_passes(1, 300) == 3
    assert MINI.test_passes(100, 199) == 1
    assert MINI.test_passes(101, 199) == 0
    no_init = Schedule(**{**MINI.__dict__, "test_initialization": False})
    assert no_init.test_passes(0, 300) == 3
    assert Schedule(**{**MINI.__dict__, "test_interval": 0}).test_passes(0, 300) == 0


def test_time_left_counts_iterations_and_tests():
    clock = TrainingClock(MINI, start=100, end=200)
    # 10 iterations a second, measured over iterations 101..111
    for i, it in enumerate(range(101, 112)):
        clock.on_iteration(it, now=i * 0.1)
    assert clock.iterations_per_second == pytest.approx(10.0)
    # a test pass: 8 batches at 20 batches a second
    for i in range(1, 9):
        clock.on_test_batch(200, i, 8, now=10 + i * 0.05)
    clock.on_iteration(111, now=20)  # back to training (rates kept per kind)
    for i in range(1, 11):
        clock.on_iteration(111 + i, now=20 + i * 0.1)
    it = clock.iteration
    segment = clock.seconds_left(200)
    assert segment == pytest.approx((200 - it) * 0.1)        # the test at 200 is the next segment's
    total = clock.seconds_left(300)
    assert total == pytest.approx((300 - it) * 0.1 + 2 * 8 * 0.05)  # tests at 200 and 300


def test_days_of_training_are_said_during_the_first_test_pass():
    clock = TrainingClock(ALEXNET, start=0, end=10_000)
    for batch in range(1, 31):  # 30 test batches of 50 images, 4 a second
        clock.on_test_batch(0, batch, 1000, now=batch * 0.25)
    per_iter, measured = clock.seconds_per_iteration
    assert not measured
    assert per_iter == pytest.approx(3.0 * (256 / 50) * 0.25)  # ~3 forwards per training image
    text = clock.describe()
    assert "testing at iteration 0: batch 30/1000" in text and "days" in text
    assert "estimated from the test speed" in text


def test_durations_read_naturally():
    assert [duration(s) for s in (42, 425, 12_000, 4.5e6)] == [
        "42 s", "7 min 5 s", "3 h 20 min", "52 days 2 h"]
    assert duration(None) == "unknown"
