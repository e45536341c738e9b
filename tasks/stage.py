"""What every pipeline stage shares: its result record, its cache policy, how the flow calls it
(deciding ran / cached / forced, and which upstream task runs it waits for, so the run's graph
shows the DAG's edges), how a stage fails (one line, `StageFailed`), and the progress artifacts
it updates while it works.

A stage task takes `cache_key` (computed by the flow with tasks.cache.stage_key) and returns a
`StageResult`: paths, counts, digests and timings, never arrays (PREFECT_NOTES: a 64 MB array
made a 92 MB cache record). Results are persisted under the data root, so every process that
uses the same data root (a worker's flow run, `imagenet pipeline`, the demo, the tests) shares
the cache.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from pydantic import BaseModel, Field

from data.errors import ImagenetError
from tasks.cache import stale_reason

# The result store lives in the data root (not $HOME): delete the data root, lose the cache.
RESULTS_DIRNAME = ".prefect-results"
# Progress artifacts are updated at most this often: each update is an API call, and an event
# that `prefect deployment run --watch` prints as one line.
PROGRESS_MIN_INTERVAL_S = 2.0
PERCENT = 100.0
# Prefect's name for a state whose result came from the cache.
CACHED_STATE = "Cached"
# What a user can fix (the command line's contract, flows/cli.py): a stage failing with one of
# these fails in one line; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ImagenetError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Why a stage ran when the cache could not be used (stage_options, StageRun.why).
WHY_FORCED = "forced"
WHY_NO_RECORD = "no cache record"


class StageResult(BaseModel):
    """The small record a stage returns and the cache stores."""

    stage: str
    key: str
    outputs: dict[str, str] = Field(default_factory=dict)
    record: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    throughput: str = ""


class RecordedKey(CachePolicy):
    """Cache on the `cache_key` parameter the flow computed (tasks.cache.stage_key): the key
    covers inputs, parameters and code; nothing else (no run id) so it is reused across runs."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return inputs.get("cache_key")


def results_dir(data_root: Path | str) -> Path:
    return Path(data_root) / RESULTS_DIRNAME


@dataclass
class StageRun:
    """How one stage went in this flow run: its result, whether it ran, how long it took."""

    name: str
    result: StageResult
    status: str  # "ran" or "cached"
    wall_seconds: float
    # why it ran: "forced", "no recorded outputs", "inputs, params or code changed", ...
    why: str = ""
    state: State | None = None  # the task run's final state (downstream stages wait on it)

    @property
    def ran(self) -> bool:
        return self.status == "ran"


class StageFailed(Exception):
    """A stage could not run or failed: the flow ends Failed with `str(self)` as its one-line
    state message ("stage convert-train: ...")."""

    def __init__(self, stage: str, cause: str) -> None:
        super().__init__(f"stage {stage}: {cause}")
        self.stage, self.cause = stage, cause


class StageCancelled(StageFailed):
    """A stage stopped on request (SIGTERM from a cancelled run, SIGINT) after saving its work:
    the flow ends Cancelled with `str(self)` as its state message."""


def one_line(err: BaseException) -> str:
    """An error as one line: its message (a user error's says what and where), prefixed by its
    type when it is not a user error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


def fail_in_one_line(fn: Callable[..., StageResult]) -> Callable[..., StageResult | State]:
    """Decorator for a stage task's body: a user error (bad or missing input) ends the task run
    Failed with the error as its one-line message, the traceback at DEBUG only (Prefect would log
    it at ERROR); the flow then reports it in its own state message. Other errors propagate
    unchanged (retries apply; a bug keeps its traceback). Retry conditions see the error itself:
    the Failed state carries it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> StageResult | State:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            log = get_run_logger()
            log.debug("%s failed", fn.__name__, exc_info=True)
            log.error("%s", one_line(err))
            return Failed(message=one_line(err), data=err)

    return wrapper


def stage_options(
    data_root: Path | str, key: str, outputs: Iterable[Path | str], force: bool | str
) -> tuple[dict[str, Any], str]:
    """Task options for one call: result storage under the data root, and refresh_cache=True
    when forced or when the recorded outputs are missing or stale. `force` may be a reason
    ("val LMDB rebuilt in this run"); True means the user forced it. Returns (options, why)
    where `why` says why the cache is bypassed ('' when it may be used)."""
    stale = stale_reason(outputs, key)
    refresh = bool(force) or bool(stale)
    options: dict[str, Any] = {
        "result_storage": results_dir(data_root),
        # None (not False) lets PREFECT_TASKS_REFRESH_CACHE apply when we are not forcing.
        "refresh_cache": True if refresh else None,
    }
    if not refresh:
        return options, ""
    if force is True:  # the user's word comes first
        return options, WHY_FORCED
    return options, stale or str(force)  # missing outputs explain more than "val rebuilt"


def state_status(state: State, bypass: str) -> tuple[str, str]:
    """(status, why) of a finished stage call; `bypass` is stage_options' reason."""
    if state.name == CACHED_STATE:
        return "cached", ""
    return "ran", bypass or WHY_NO_RECORD


def _timed(state: State, bypass: str, start: float) -> tuple[str, float, str]:
    status, why = state_status(state, bypass)
    return status, time.monotonic() - start, why


def _finished(name: str, state: State, bypass: str, start: float) -> StageRun:
    """The StageRun of a finished task run; StageFailed (one line) when it failed,
    StageCancelled when it stopped on request."""
    if state.is_cancelled():
        raise StageCancelled(name, state.message or state.name)
    if state.is_failed() or state.is_crashed():
        try:
            state.result()
        except BaseException as err:  # the stage's own error, reported as one line
            raise StageFailed(name, one_line(err)) from err
        raise StageFailed(name, state.message or state.name)
    return StageRun(name, state.result(), *_timed(state, bypass, start), state=state)


def call_stage(
    task: Task,
    name: str,
    *,
    results_root: Path | str,
    cache_key: str,
    outputs: Iterable[Path | str],
    force: bool | str = False,
    after: Sequence[State | None] = (),
    **kwargs: Any,
) -> StageRun:
    """Run `task` now (in the flow's thread), deciding whether it may come from the cache.
    `after`: the states of the upstream task runs, recorded as the run's dependencies (the
    edges of the flow run's graph); None entries (stages not run this time) are skipped."""
    options, bypass = stage_options(results_root, cache_key, outputs, force)
    start = time.monotonic()
    state = task.with_options(task_run_name=name, **options)(
        cache_key=cache_key, return_state=True, wait_for=[s for s in after if s is not None],
        **kwargs)
    return _finished(name, state, bypass, start)


def submit_stage(
    task: Task,
    name: str,
    *,
    results_root: Path | str,
    cache_key: str,
    outputs: Iterable[Path | str],
    force: bool | str = False,
    after: Sequence[State | None] = (),
    **kwargs: Any,
) -> Callable[[], StageRun]:
    """Submit `task` to the flow's task runner (concurrently with others); returns a function
    that waits for it and gives the StageRun (StageFailed when it failed)."""
    options, bypass = stage_options(results_root, cache_key, outputs, force)
    start = time.monotonic()
    future = task.with_options(task_run_name=name, **options).submit(
        cache_key=cache_key, wait_for=[s for s in after if s is not None], **kwargs)
    # Its own end, not the moment the flow got round to waiting for it: the flow waits for
    # concurrent stages one after the other, and each would otherwise show the group's time.
    finished: list[float] = []
    future.add_done_callback(lambda _: finished.append(time.monotonic()))

    def wait() -> StageRun:
        future.wait()
        run = _finished(name, future.state, bypass, start)
        run.wall_seconds = (finished[0] if finished else time.monotonic()) - start
        return run

    return wait


class ProgressArtifact:
    """A Prefect progress artifact that follows a library's `progress(done, total)` callback.

    Throttled: the library may call it per image; the API sees one call per
    PROGRESS_MIN_INTERVAL_S at most, and the last one (`finish()`, 100%) whatever the timing.
    The artifact is created by the first call that passes the throttle, so a stage that ends
    within PROGRESS_MIN_INTERVAL_S shows no bar at all (each call is one more line in
    `prefect deployment run --watch`), and every bar that exists ends at 100%.
    `describe(text)` changes the description shown under the bar with the next update (the
    training stage puts iterations/s and the time left there)."""

    def __init__(self, description: str, min_interval: float = PROGRESS_MIN_INTERVAL_S) -> None:
        self.description = description
        self.min_interval = min_interval
        self.percent = 0.0
        self.started = self._last = time.monotonic()
        self._id: Any = None

    def describe(self, description: str) -> None:
        self.description = description

    def __call__(self, done: int, total: int | None) -> None:
        percent = min(PERCENT * done / total, PERCENT) if total else 0.0
        self._update(percent, final=False)

    def _update(self, percent: float, final: bool) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval and not (final and self._id is not None):
            return
        self._last, self.percent = now, percent
        try:
            if self._id is None:
                self._id = create_progress_artifact(progress=percent, description=self.description)
            else:
                update_progress_artifact(artifact_id=self._id, progress=percent,
                                         description=self.description)
        except Exception as err:  # a flaky API must never kill a 3-day conversion
            get_run_logger().debug("progress artifact update failed: %s", err)

    def finish(self, description: str | None = None, percent: float = PERCENT) -> None:
        """The stage finished (100%) or stopped (`percent`): shown now, when the bar exists or
        the stage took long enough to deserve one."""
        if description is not None:
            self.description = description
        self._update(percent, final=True)
