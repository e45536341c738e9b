"""tasks.stage.StageGroup: stages that run at the same time stop together. When one fails, the
one still working (reporting progress) and the one waiting out a long retry delay end
Cancelled within seconds, saying which stage failed; nothing is left running or Crashed; every
stage that ran has a progress card titled by it."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

LONG_RETRY_DELAY_S = 120
WORK_S = 120


def test_a_failed_stage_stops_the_stages_beside_it(tmp_path):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from data.errors import ImagenetError
    from tasks.stage import (ProgressArtifact, RecordedKey, StageFailed, StageGroup, StageResult,
                             fail_in_one_line)

    @task(cache_policy=RecordedKey())
    @fail_in_one_line
    def fails(cache_key: str) -> StageResult:
        time.sleep(1.0)
        raise ImagenetError("archive x: no such file")

    @task(cache_policy=RecordedKey())
    @fail_in_one_line
    def works(cache_key: str) -> StageResult:
        progress = ProgressArtifact("long work (images)")
        for i in range(int(WORK_S / 0.05)):
            progress(i, int(WORK_S / 0.05))
            time.sleep(0.05)
        return StageResult(stage="works", key=cache_key)

    @task(cache_policy=RecordedKey(), retries=3, retry_delay_seconds=[LONG_RETRY_DELAY_S])
    @fail_in_one_line
    def flaky(cache_key: str) -> StageResult:
        raise ConnectionResetError("the link dropped")

    @flow
    def three() -> str:
        group = StageGroup()
        for name, fn in (("flaky", flaky), ("works", works), ("fails", fails)):
            group.submit(fn, name, results_root=tmp_path, cache_key=f"{name}-{time.time()}",
                         outputs=[])
        try:
            group.wait()
        except StageFailed as err:
            return f"{err}|{sorted(group.stopped)}"
        return "no failure"

    start = time.monotonic()
    state = three(return_state=True)
    took = time.monotonic() - start
    message = state.result()
    assert took < 30, took
    failure, stopped = message.split("|")
    assert failure == "stage fails: archive x: no such file"
    assert "('flaky', 'cancelled: stage fails: archive x: no such file')" in stopped
    assert "('works', 'cancelled: stage fails: archive x: no such file')" in stopped
    with get_client(sync_client=True) as client:
        flow_run = state.state_details.flow_run_id
        deadline = time.monotonic() + 30
        while True:
            runs = {r.name: r for r in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))}
            if (len(runs) == 3 and all(r.state.is_final() for r in runs.values())) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {n: r.state.name for n, r in runs.items()} == {
            "fails": "Failed", "works": "Cancelled", "flaky": "Cancelled"}
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run])))
    keys = {a.key for a in artifacts if a.type == "progress"}
    assert {"progress-works", "progress-fails", "progress-flaky"} <= keys


def test_tracebacks_go_to_debug_not_error():
    """A task that fails with an unexpected error after its retries: Prefect's ERROR line stays
    one line; its traceback is a DEBUG record (tasks/logs.py)."""
    import logging

    from prefect import flow, task

    import flows.imagenet  # noqa: F401 - installs the filter, as in every flow process

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addHandler(keep)
    old = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)

    @task(retries=1, retry_delay_seconds=0)
    def broken() -> None:
        raise RuntimeError("a bug in a stage")

    @flow
    def run() -> None:
        broken()

    try:
        state = run(return_state=True)
    finally:
        for logger, level in zip(loggers, old):
            logger.removeHandler(keep)
            logger.setLevel(level)
    assert state.is_failed()
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert errors and not any(r.exc_info for r in errors)
    assert any("a bug in a stage" in r.getMessage() for r in errors)
    assert any(r.levelno == logging.DEBUG and r.exc_info and "a bug in a stage" in
               r.getMessage() for r in records)
