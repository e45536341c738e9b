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

import contextvars
import functools
import math
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Failed, State
from pydantic import BaseModel, Field

from data.errors import ImagenetError
from tasks.cache import stale_reason

# The result store lives in the data root (not $HOME): delete the data root, lose the cache.
RESULTS_DIRNAME = ".prefect-results"
# Progress artifacts are updated at most this often: each update is an API call, and an event
# that `prefect deployment run --watch` prints as one line.
PROGRESS_MIN_INTERVAL_S = 2.0
PERCENT = 100.0
# --watch shows a progress line at most this often per stage, or each time the bar moves this
# many percent (a 100-minute conversion: ~25 lines, not 3,000), and always the last one.
WATCH_EVENT_INTERVAL_S = 60.0
WATCH_EVENT_STEP = 10.0
PROGRESS_EVENT = "imagenet.progress"
# How long a cancelled run waits for the stages of a group to stop (a socket read blocks until
# its timeout; the rest stop at their next progress report).
ABORT_WAIT_S = 15.0
PROGRESS_KEY = "progress-{stage}"
BYTES = "bytes"
_UNIT_RE = re.compile(r"\((images|bytes|records|files)\b")
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


class StageAborted(BaseException):
    """Raised inside a stage (by its progress callback or a retry wait) when the flow stops the
    stages running beside one that failed, or the run is cancelled. A BaseException, like
    KeyboardInterrupt, so the libraries' `except Exception` clauses do not swallow it while
    their `except BaseException: clean up; raise` clauses still run; the stage's task ends
    Cancelled with the reason (fail_in_one_line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Abort:
    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


# The abort flag of the StageGroup a task was submitted from (contextvars travel with the task
# into Prefect's worker thread); the progress artifacts of the task run being executed.
_ABORT: contextvars.ContextVar[_Abort | None] = contextvars.ContextVar("imagenet_abort",
                                                                      default=None)
_STAGE_PROGRESS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "imagenet_stage_progress", default=None)
# (cache key, why) when the flow found the stage's recorded outputs intact for its key: the task
# answers from its cache record itself, so its Cached state says why (cached_state).
_CACHED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "imagenet_cached", default=None)


def why_cached(outputs: Iterable[Path | str], key: str) -> str:
    """A cached stage's state message: why its outputs are reused."""
    from datetime import datetime, timezone

    from tasks.cache import manifest_path

    stamps = [manifest_path(p).stat().st_mtime for p in outputs if manifest_path(p).is_file()]
    when = (datetime.fromtimestamp(max(stamps), timezone.utc).strftime(" (%Y-%m-%d %H:%M UTC)")
            if stamps else "")
    return (f"cached: inputs, parameters and code are those its outputs were made with{when}, "
            f"and the outputs are intact (their manifests match); cache key {key}")


def cached_state(key: str, why: str) -> State | None:
    """The Cached state of a stage whose cache record exists: its recorded result, `why` as
    the message, the key in the state details. None when there is no record (the stage runs)."""
    from prefect.results import get_result_store
    from prefect.states import Completed

    try:
        record = get_result_store().read(key)
    except Exception:  # no record (or an unreadable one): compute the stage instead
        return None
    state = Completed(name=CACHED_STATE, message=why, data=record.result)
    state.state_details.cache_key = key
    return state


def _may_answer_from_cache(options: dict[str, Any], bypass: str, key: str,
                           outputs: Iterable[Path | str]) -> tuple[str, str] | None:
    """When the cache may be used (and Prefect's setting does not refresh everything), the
    task reads its record itself (so its state can say why); Prefect must not read it first."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    if bypass or not key or PREFECT_TASKS_REFRESH_CACHE.value():
        return None
    options["refresh_cache"] = True
    return key, why_cached(outputs, key)


def check_abort() -> None:
    """Raise StageAborted when this stage's group is being stopped."""
    abort = _ABORT.get()
    if abort is not None and abort.event.is_set():
        raise StageAborted(abort.reason)


def abortable_sleep(seconds: float) -> None:
    """time.sleep that ends early (StageAborted) when this stage's group is stopped: hand it to
    a library that backs off between retries (data.download's `sleep=`)."""
    abort = _ABORT.get()
    if abort is None:
        time.sleep(seconds)
        return
    abort.event.wait(seconds)
    check_abort()


def current_stage_name() -> str | None:
    """The name of the task run being executed ("convert-train"), if any."""
    ctx = TaskRunContext.get()
    return ctx.task_run.name if ctx is not None and ctx.task_run is not None else None


def progress_key(stage: str | None) -> str | None:
    """The artifact key of a stage's progress card (lowercase letters, digits and dashes, as
    Prefect requires): the card's title in the UI."""
    if not stage:
        return None
    slug = re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")
    return PROGRESS_KEY.format(stage=slug) if slug else None


def _unit_of(description: str) -> str | None:
    match = _UNIT_RE.search(description)
    return match.group(1) if match else None


def _amount(value: int, unit: str | None) -> str:
    if unit == BYTES:
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value} B"
    return f"{value:,}"


def _patch_artifact(artifact_id: Any, percent: float, description: str) -> None:
    """update_progress_artifact without Prefect's `prefect.artifact.updated` event (which
    --watch prints as the artifact's id): the progress event is sent by the caller."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.request("PATCH", "/artifacts/{id}", path_params={"id": artifact_id},
                       json={"data": float(percent), "description": description})


def _progress_event(artifact_id: Any, line: str) -> None:
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    related = []
    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    if task_ctx is not None and task_ctx.task_run is not None:
        related.append({"prefect.resource.id": f"prefect.task-run.{task_ctx.task_run.id}",
                        "prefect.resource.role": "task-run"})
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_ctx.flow_run.id}",
                        "prefect.resource.role": "flow-run"})
    emit_event(event=PROGRESS_EVENT,
               resource={"prefect.resource.id": f"prefect.artifact.{artifact_id}",
                         "prefect.resource.name": line},
               related=related)


def one_line(err: BaseException) -> str:
    """An error as one line: its message (a user error's says what and where), prefixed by its
    type when it is not a user error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


def fail_in_one_line(fn: Callable[..., StageResult]) -> Callable[..., StageResult | State]:
    """Decorator for a stage task's body: a user error (bad or missing input) ends the task run
    Failed with the error as its one-line message, the traceback at DEBUG only (Prefect would log
    it at ERROR); the flow then reports it in its own state message. StageAborted (the flow
    stopped the stages beside a failed one) ends it Cancelled with the reason. Other errors
    propagate unchanged (retries apply; a bug keeps its traceback, at DEBUG: tasks.logs).
    Retry conditions see the error itself: the Failed state carries it.

    Every stage that ran leaves a progress card titled by the stage: one that reported no
    progress gets one at the end (100%, or where it stopped and why)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> StageResult | State:
        cached = _CACHED.get()
        if cached is not None:
            state = cached_state(*cached)
            if state is not None:
                return state
        cards: list[ProgressArtifact] = []
        token = _STAGE_PROGRESS.set(cards)
        start = time.monotonic()
        try:
            check_abort()
            result = fn(*args, **kwargs)
        except StageAborted as stop:
            message = f"cancelled: {stop.reason}"
            get_run_logger().warning("%s", message)
            _close_cards(cards, message)
            return Cancelled(message=message)
        except (TerminationSignal, KeyboardInterrupt) as stop:
            # The run was cancelled (the worker's SIGTERM) or interrupted (Ctrl-C) while this
            # stage worked: it ends Cancelled, not Crashed, and the flow ends Cancelled too.
            # (Training handles its own signals, snapshotting first: model/stop.py.)
            name = signal.Signals(stop.signal).name if isinstance(stop, TerminationSignal) \
                else "SIGINT"
            message = f"stopped by {name}; a rerun runs this stage again"
            get_run_logger().warning("%s", message)
            _close_cards(cards, f"cancelled: {message}")
            return Cancelled(message=message)
        except USER_ERRORS as err:
            log = get_run_logger()
            log.debug("%s failed", fn.__name__, exc_info=True)
            log.error("%s", one_line(err))
            _close_cards(cards, f"failed: {one_line(err)}")
            return Failed(message=one_line(err), data=err)
        except Exception as err:
            _close_cards(cards, f"failed: {one_line(err)}")
            raise
        finally:
            _STAGE_PROGRESS.reset(token)
        if isinstance(result, StageResult) and not cards:
            ProgressArtifact("").finish(f"done in {time.monotonic() - start:.1f} s")
        return result

    return wrapper


def _close_cards(cards: list["ProgressArtifact"], why: str) -> None:
    """A stage that stopped: its card shows where and why (a stage without one gets one); the
    --watch line says only "failed" or "cancelled" (the cause follows in the run's event)."""
    word = why.split(":", 1)[0]
    if not cards:
        ProgressArtifact("").finish(why, percent=0.0, watch=word)
        return
    for card in cards:
        if card.percent < PERCENT:
            card.finish(why, percent=card.percent, watch=word)


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
    outputs = list(outputs)
    options, bypass = stage_options(results_root, cache_key, outputs, force)
    token = _CACHED.set(_may_answer_from_cache(options, bypass, cache_key, outputs))
    start = time.monotonic()
    try:
        state = task.with_options(task_run_name=name, **options)(
            cache_key=cache_key, return_state=True, wait_for=[s for s in after if s is not None],
            **kwargs)
    finally:
        _CACHED.reset(token)
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


def _delay_for(delays: Any, attempt: int) -> float:
    """Prefect's retry_delay_seconds for retry number `attempt` (1-based): a number, or a list
    whose last value repeats."""
    if not delays:
        return 0.0
    if isinstance(delays, (int, float)):
        return float(delays)
    delays = list(delays)
    return float(delays[min(attempt - 1, len(delays) - 1)])


class StageGroup:
    """Stages that run at the same time (the three downloads): submitted together, waited for
    together. When one fails, the others are stopped, so none is left downloading, sleeping
    before a retry or ending Crashed when the flow process exits: their progress callback and
    their retry wait raise StageAborted, and their task runs end Cancelled, saying which stage
    failed. The flow then fails with the first failure's one line.

    Prefect sleeps out a task's retry_delay_seconds where nothing can wake it, so a stage of a
    group is given its retry delays here instead: its retry condition waits for them on the
    group's abort flag (the task run shows Running meanwhile, and the log says when the retry
    starts), and retries at once when stopped, so the retry ends Cancelled."""

    def __init__(self) -> None:
        self.abort = _Abort()
        self._pending: list[tuple[str, Any, str, float, list[float]]] = []
        self.runs: list[StageRun] = []
        self.stopped: list[tuple[str, str]] = []  # (stage, message) of those it cancelled
        self.failed: list[StageFailed] = []  # every failure, the first one first

    def submit(self, task: Task, name: str, *, results_root: Path | str, cache_key: str,
               outputs: Iterable[Path | str], force: bool | str = False,
               after: Sequence[State | None] = (), **kwargs: Any) -> None:
        outputs = list(outputs)
        options, bypass = stage_options(results_root, cache_key, outputs, force)
        if task.retries:
            options.update(retry_condition_fn=self._retry_condition(task),
                           retry_delay_seconds=0)
        start = time.monotonic()
        token = _ABORT.set(self.abort)
        cached = _CACHED.set(_may_answer_from_cache(options, bypass, cache_key, outputs))
        try:
            future = task.with_options(task_run_name=name, **options).submit(
                cache_key=cache_key, wait_for=[s for s in after if s is not None], **kwargs)
        finally:
            _CACHED.reset(cached)
            _ABORT.reset(token)
        finished: list[float] = []
        future.add_done_callback(lambda _: finished.append(time.monotonic()))
        self._pending.append((name, future, bypass, start, finished))

    def _retry_condition(self, task: Task) -> Callable[..., bool]:
        condition, delays, abort = task.retry_condition_fn, task.retry_delay_seconds, self.abort

        def retry(t: Any, task_run: Any, state: State) -> bool:
            if abort.event.is_set():
                return True  # the retry starts at once and ends Cancelled (fail_in_one_line)
            if condition is not None and not condition(t, task_run, state):
                return False
            delay = _delay_for(delays, task_run.run_count)
            if delay > 0:
                get_run_logger().info("retry %d/%d in %s (%s)", task_run.run_count, task.retries,
                                      _seconds(delay), state.message or state.name)
                abort.event.wait(delay)
            return True

        return retry

    def wait_quietly(self) -> None:
        """Wait for what was submitted, ignoring the outcome (the caller is failing anyway)."""
        for _, future, *_ in self._pending:
            future.wait()

    def wait(self) -> list[StageRun]:
        """Wait for every stage; StageFailed (the first failure) when one failed, after the
        others stopped. The StageRuns of those that finished are in `self.runs` either way."""
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_any

        failure: StageFailed | None = None
        pending = {item[1].wrapped_future: item for item in self._pending}
        try:
            while pending:
                done, _ = wait_any(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    name, future, bypass, start, finished = pending.pop(fut)
                    future.wait()
                    try:
                        run = _finished(name, future.state, bypass, start)
                    except StageCancelled as stop:
                        self.stopped.append((name, stop.cause))
                        if failure is None:
                            failure = stop
                        continue
                    except StageFailed as err:
                        if failure is None or isinstance(failure, StageCancelled):
                            failure = err
                        self.failed.append(err)
                        self.abort.set(str(err))
                        continue
                    run.wall_seconds = (finished[0] if finished else time.monotonic()) - start
                    self.runs.append(run)
        except BaseException:  # the run is being cancelled: stop the stages still running
            self.abort.set("the flow run was stopped")
            for _, future, *_ in pending.values():
                future.wait(ABORT_WAIT_S)
            raise
        if failure is not None:
            raise failure
        return self.runs


def _seconds(value: float) -> str:
    from tasks.eta import duration

    return duration(value)


class ProgressArtifact:
    """A Prefect progress artifact that follows a library's `progress(done, total)` callback.

    Its card is titled by the stage (the artifact key `progress-<task run name>`, e.g.
    `progress-convert-train`) and created by the first call, so every stage that reports
    progress has one, however short. Later updates are throttled: the API sees one call per
    PROGRESS_MIN_INTERVAL_S at most, and the last one (`finish()`, 100%, or where the stage
    stopped) whatever the timing. `describe(text)` changes the text shown under the bar with the
    next update (the training stage puts iterations/s and the time left there).

    `prefect deployment run --watch` prints a run's events, one line each, as `<event> *
    <resource name>`; Prefect's own update event names the artifact by its id only. So updates
    are sent here with an `imagenet.progress` event named in words, e.g. `convert-train: 45%
    (1,170 of 2,600 images), 3 s left`, at most every WATCH_EVENT_INTERVAL_S or each
    WATCH_EVENT_STEP percent, and at the end. Any failure of the API is logged at DEBUG and
    ignored: progress never stops a stage. While a flow aborts a group of concurrent stages
    (StageGroup), the call raises StageAborted, which stops the library's loop."""

    def __init__(self, description: str, min_interval: float = PROGRESS_MIN_INTERVAL_S, *,
                 unit: str | None = None, stage: str | None = None) -> None:
        self.description = description
        self.min_interval = min_interval
        self.unit = unit or _unit_of(description)
        self.stage = stage or current_stage_name()
        self.percent = 0.0
        self.done: int | None = None
        self.total: int | None = None
        self.started = self._last = time.monotonic()
        self._last_event = -math.inf
        self._last_event_percent = -PERCENT
        self._id: Any = None
        self._described = False  # describe() text says more than the counts (training)
        self._final_text: str | None = None
        # The task run's context, for updates a library makes from its own threads (the mean's
        # readers): the artifact and the event must belong to the task run.
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        holder = _STAGE_PROGRESS.get()
        if holder is not None:
            holder.append(self)

    @property
    def key(self) -> str:
        return progress_key(self.stage)

    def describe(self, description: str) -> None:
        self.description = description
        self._described = True

    def __call__(self, done: int, total: int | None) -> None:
        check_abort()
        self.done, self.total = done, total
        percent = min(PERCENT * done / total, PERCENT) if total else 0.0
        self._update(percent, final=False)

    def _update(self, percent: float, final: bool) -> None:
        with self._lock:  # a library may report from several threads
            now = time.monotonic()
            if (self._id is not None and now - self._last < self.min_interval
                    and not final):
                return
            self._last, self.percent = now, percent
            self._context.copy().run(self._send, percent, final, now)

    def _send(self, percent: float, final: bool, now: float) -> None:
        try:
            if self._id is None:
                self._id = create_progress_artifact(progress=percent, key=self.key,
                                                    description=self.description)
            else:
                _patch_artifact(self._id, percent, self.description)
            if final or (percent < PERCENT and (
                    now - self._last_event >= WATCH_EVENT_INTERVAL_S
                    or percent - self._last_event_percent >= WATCH_EVENT_STEP)):
                self._last_event, self._last_event_percent = now, percent
                _progress_event(self._id, self.line(final))
        except Exception as err:  # a flaky API must never kill a 3-day conversion
            get_run_logger().debug("progress artifact update failed: %s", err)

    def line(self, final: bool = False) -> str:
        """The stage's progress in words (the --watch line)."""
        from tasks.eta import duration

        head = f"{self.stage or 'stage'}: {self.percent:.0f}%"
        elapsed = time.monotonic() - self.started
        if final:
            if self._final_text:
                return f"{head} - {self._final_text}"
            amount = (f", {_amount(self.total, self.unit)}"
                      + (f" {self.unit}" if self.unit and self.unit != BYTES else "")
                      if self.total else "")
            return f"{head} - done in {duration(elapsed)}{amount}"
        if self._described or self.done is None or not self.total:
            return f"{head} - {self.description}" if self.description else head
        unit = f" {self.unit}" if self.unit and self.unit != BYTES else ""
        line = f"{head} ({_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}{unit})"
        # A rate from the first item or two is noise: the time left once a little is done.
        if 0 < self.done < self.total and (self.percent >= 1 or elapsed >= self.min_interval):
            line += f", {duration((self.total - self.done) * elapsed / self.done)} left"
        return line

    def finish(self, description: str | None = None, percent: float = PERCENT,
               watch: str | None = None) -> None:
        """The stage finished (100%) or stopped (`percent`): shown now, creating the card if
        no progress was reported before. `watch`: a shorter text for the --watch line than
        the card's description (a failure's cause is in the run's own failed event)."""
        if description is not None:
            self.description = self._final_text = description
        if watch is not None:
            self._final_text = watch
        self._update(percent, final=True)
