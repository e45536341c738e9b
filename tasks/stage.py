"""What every pipeline stage shares: its result record, its cache policy, how the flow calls it
(deciding ran / cached / forced), and the progress artifacts it updates while it works.

A stage task takes `cache_key` (computed by the flow with tasks.cache.stage_key) and returns a
`StageResult`: paths, counts, digests and timings, never arrays (PREFECT_NOTES: a 64 MB array
made a 92 MB cache record). Results are persisted under the data root, so every process that
uses the same data root (a worker's flow run, `imagenet pipeline`, the demo, the tests) shares
the cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import BaseModel, Field

from tasks.cache import stale_reason

# The result store lives in the data root (not $HOME): delete the data root, lose the cache.
RESULTS_DIRNAME = ".prefect-results"
# Progress artifacts are updated at most this often: each update is an API call.
PROGRESS_MIN_INTERVAL_S = 1.0
# Prefect's name for a state whose result came from the cache.
CACHED_STATE = "Cached"


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
    why: str = ""  # why it ran: "forced", "outputs missing or changed", "inputs, params or code changed", ...

    @property
    def ran(self) -> bool:
        return self.status == "ran"


def stage_options(
    data_root: Path | str, key: str, outputs: Iterable[Path | str], force: bool
) -> tuple[dict[str, Any], str]:
    """Task options for one call: result storage under the data root, and refresh_cache=True
    when forced or when the recorded outputs are missing or stale. Returns (options, why) where
    `why` says why the cache is bypassed ('' when it may be used)."""
    stale = stale_reason(outputs, key)
    refresh = force or bool(stale)
    options: dict[str, Any] = {
        "result_storage": results_dir(data_root),
        # None (not False) lets PREFECT_TASKS_REFRESH_CACHE apply when we are not forcing.
        "refresh_cache": True if refresh else None,
    }
    return options, ("forced" if force else stale) if refresh else ""


def state_status(state: State, bypass: str) -> tuple[str, str]:
    """(status, why) of a finished stage call; `bypass` is stage_options' reason."""
    if state.name == CACHED_STATE:
        return "cached", ""
    return "ran", bypass or "no cache record"


def _timed(state: State, bypass: str, start: float) -> tuple[str, float, str]:
    status, why = state_status(state, bypass)
    return status, time.monotonic() - start, why


def call_stage(
    task: Task,
    name: str,
    *,
    results_root: Path | str,
    cache_key: str,
    outputs: Iterable[Path | str],
    force: bool = False,
    **kwargs: Any,
) -> StageRun:
    """Run `task` now (in the flow's thread), deciding whether it may come from the cache."""
    options, bypass = stage_options(results_root, cache_key, outputs, force)
    start = time.monotonic()
    state = task.with_options(task_run_name=name, **options)(
        cache_key=cache_key, return_state=True, **kwargs
    )
    result = state.result()  # raises the stage's error when it failed
    return StageRun(name, result, *_timed(state, bypass, start))


def submit_stage(
    task: Task,
    name: str,
    *,
    results_root: Path | str,
    cache_key: str,
    outputs: Iterable[Path | str],
    force: bool = False,
    **kwargs: Any,
) -> Callable[[], StageRun]:
    """Submit `task` to the flow's task runner (concurrently with others); returns a function
    that waits for it and gives the StageRun."""
    options, bypass = stage_options(results_root, cache_key, outputs, force)
    start = time.monotonic()
    future = task.with_options(task_run_name=name, **options).submit(cache_key=cache_key, **kwargs)
    # Its own end, not the moment the flow got round to waiting for it: the flow waits for
    # concurrent stages one after the other, and each would otherwise show the group's time.
    finished: list[float] = []
    future.add_done_callback(lambda _: finished.append(time.monotonic()))

    def wait() -> StageRun:
        future.wait()
        state = future.state
        result = state.result()
        status, _, why = _timed(state, bypass, start)
        end = finished[0] if finished else time.monotonic()  # callback not run yet: just now
        return StageRun(name, result, status, end - start, why)

    return wait


class ProgressArtifact:
    """A Prefect progress artifact that follows a library's `progress(done, total)` callback.

    Throttled: the library may call it per image; the API sees one update a second at most."""

    def __init__(self, description: str, min_interval: float = PROGRESS_MIN_INTERVAL_S) -> None:
        self.description = description
        self.min_interval = min_interval
        self._last = 0.0
        self._id = create_progress_artifact(progress=0.0, description=description)

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = bool(total) and done >= total
        if not finished and now - self._last < self.min_interval:
            return
        self._last = now
        percent = 100.0 * done / total if total else 0.0
        try:
            update_progress_artifact(artifact_id=self._id, progress=min(percent, 100.0))
        except Exception as err:  # a flaky API must never kill a 3-day conversion
            get_run_logger().debug("progress artifact update failed: %s", err)

    def finish(self) -> None:
        self(1, 1)
