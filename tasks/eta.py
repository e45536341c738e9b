"""How long training has left, for the training stage's progress artifact and log.

Caffe's Solver::Step alternates training iterations with test passes (every `test_interval`
iterations, `test_iter` batches per test net, also at iteration 0 when `test_initialization`,
and once more at max_iter; src/caffe/solver.cpp). The time left is therefore
    (iterations left) x (seconds per iteration) + (test passes left) x (batches per pass) x
    (seconds per test batch),
with both rates measured in this process (the first training step, which includes XLA's
compile, is left out). Before any training iteration has been timed (bvlc_alexnet's first test
pass is 1000 batches: many minutes on a CPU) the iteration time is estimated from the test
speed: a training image costs about TRAIN_COST_IN_FORWARDS forward passes (forward + backward;
MACHINE_NOTES: AlexNet training is 4.35 GFLOP/image, 3x forward), so a run that would take days
says so within its first minute. Everything here is pure arithmetic on what the caller measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

# Forward + backward ~ 3 forward passes per image (the backward pass computes two gradients).
TRAIN_COST_IN_FORWARDS = 3.0
# Rates come from the last this-many events, so a slow start (compile, page cache) fades out.
RATE_WINDOW = 50
MINUTE_S, HOUR_S, DAY_S = 60, 3600, 86400


@dataclass(frozen=True)
class Schedule:
    """What the solver and net say about the work: iterations, tests, batch sizes."""

    max_iter: int
    test_interval: int          # 0: no periodic tests
    test_batches: int           # sum of test_iter over the test nets: batches per test pass
    test_initialization: bool
    train_images_per_iter: int  # batch_size x iter_size of the TRAIN net
    test_batch_size: int

    def test_passes(self, lo: int, hi: int) -> int:
        """How many test passes Step()/Solve() run at iterations lo..hi (inclusive): every
        multiple of test_interval, iteration 0 only with test_initialization."""
        if not self.test_interval or not self.test_batches or hi < lo:
            return 0
        lo = max(lo, 0)
        count = hi // self.test_interval - (lo - 1) // self.test_interval
        if lo == 0 and not self.test_initialization:
            count -= 1
        return count


class _Rate:
    """Events per second over the last RATE_WINDOW events."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self, now: float) -> None:
        self.times.append(now)
        del self.times[:-RATE_WINDOW - 1]

    def reset(self) -> None:
        self.times.clear()

    @property
    def per_second(self) -> float | None:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


@dataclass
class TrainingClock:
    """Follows one training segment (iterations `start` -> `end`) and says how fast it goes and
    how long the segment and the whole training have left."""

    schedule: Schedule
    start: int
    end: int
    iteration: int = field(init=False)
    testing: tuple[int, int] | None = field(init=False, default=None)  # (batch, of) in a test
    _iters: _Rate = field(init=False, default_factory=_Rate)
    _tests: _Rate = field(init=False, default_factory=_Rate)

    def __post_init__(self) -> None:
        self.iteration = self.start

    def on_iteration(self, it: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.testing is not None:
            # A test pass sat between the last two iterations: do not count it as training time.
            self._iters.reset()
        self.testing = None
        self.iteration = it
        self._iters.tick(now)

    def on_test_batch(self, it: int, batch: int, of: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.testing is None:
            self._tests.reset()
        self.testing = (batch, of)
        self.iteration = it
        self._tests.tick(now)

    @property
    def iterations_per_second(self) -> float | None:
        return self._iters.per_second

    @property
    def seconds_per_iteration(self) -> tuple[float | None, bool]:
        """(seconds, measured): measured from training steps, else estimated from the test
        speed (measured False), else (None, False)."""
        rate = self._iters.per_second
        if rate:
            return 1.0 / rate, True
        test_rate = self._tests.per_second
        if test_rate:
            images = self.schedule.train_images_per_iter / max(self.schedule.test_batch_size, 1)
            return TRAIN_COST_IN_FORWARDS * images / test_rate, False
        return None, False

    def seconds_left(self, until: int) -> float | None:
        """Time from now to iteration `until` (tests included), or None before any rate."""
        per_iter, _ = self.seconds_per_iteration
        if per_iter is None:
            return None
        test_rate = self._tests.per_second
        per_test_batch = 1.0 / test_rate if test_rate else per_iter / TRAIN_COST_IN_FORWARDS
        left = max(until - self.iteration, 0) * per_iter
        # A segment that ends before max_iter leaves the test at its end to the next segment.
        last = until if until == self.schedule.max_iter else until - 1
        if self.testing is None:  # the test at this iteration (if one is due) is still to come
            passes = self.schedule.test_passes(self.iteration, last)
        else:  # the rest of the pass under way, then the later ones
            batch, of = self.testing
            left += max(of - batch, 0) * per_test_batch
            passes = self.schedule.test_passes(self.iteration + 1, last)
        return left + passes * self.schedule.test_batches * per_test_batch

    def describe(self) -> str:
        """One line for the progress artifact: where we are, the rate and the time left."""
        s = self.schedule
        if self.testing is not None:
            batch, of = self.testing
            rate = self._tests.per_second
            where = (f"testing at iteration {self.iteration}: batch {batch}/{of}"
                     + (f", {rate:.3g} batches/s" if rate else ""))
        else:
            rate = self._iters.per_second
            where = (f"iteration {self.iteration} of {s.max_iter} (segment {self.start}->"
                     f"{self.end})" + (f", {rate:.3g} iterations/s" if rate else ""))
        segment, total = self.seconds_left(self.end), self.seconds_left(s.max_iter)
        if total is None:
            return where
        _, measured = self.seconds_per_iteration
        how = "" if measured else " (estimated from the test speed)"
        return (f"{where}; left: this segment {duration(segment)}, all training "
                f"{duration(total)}{how}")


def duration(seconds: float | None) -> str:
    """A human duration: 42 s, 7 min 5 s, 3 h 20 min, 52 days 4 h."""
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s < MINUTE_S:
        return f"{s} s"
    if s < HOUR_S:
        return f"{s // MINUTE_S} min {s % MINUTE_S} s"
    if s < DAY_S:
        return f"{s // HOUR_S} h {s % HOUR_S // MINUTE_S} min"
    return f"{s // DAY_S} days {s % DAY_S // HOUR_S} h"
