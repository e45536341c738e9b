"""flows/services.py and tasks/accelerator.py without a whole `make up`: the variables that
prefect.yaml's job_variables read, and the accelerator slot a training run holds
(tests/flows/test_deployments_e2e.py walks the real thing)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import yaml

from flows import allocator, services
from tasks import accelerator

SLOT_TIMEOUT_S = 1


def test_deploy_variables_follow_this_host(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/usr/lib/libjemalloc.so.2")
    assert services.deploy_variables(tmp_path) == {
        services.LD_PRELOAD_VARIABLE: "/usr/lib/libjemalloc.so.2",
        services.JAX_CACHE_VARIABLE: str(tmp_path / "jax-cache")}
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    assert services.deploy_variables(tmp_path)[services.LD_PRELOAD_VARIABLE] is None


def test_every_deployment_runs_with_the_allocator_and_xla_settings():
    config = yaml.safe_load((services.PROJECT_ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["LD_PRELOAD"] == f"{{{{ prefect.variables.{services.LD_PRELOAD_VARIABLE} }}}}"
        assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
        assert env["JAX_COMPILATION_CACHE_DIR"] == (
            f"{{{{ prefect.variables.{services.JAX_CACHE_VARIABLE} }}}}")
        assert deployment["work_pool"]["name"] == services.POOL


class Lines:
    def __init__(self) -> None:
        self.info_lines: list[str] = []

    def info(self, fmt: str, *args) -> None:
        self.info_lines.append(fmt % args)

    def debug(self, fmt: str, *args) -> None:
        pass


def test_accelerator_slot_holds_one_run_and_says_when_another_waits(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from tasks.stage import StageCancelled

    log = Lines()
    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(accelerator.ACCELERATOR_LIMIT)
        except Exception:
            pass
        # Without the limit (`imagenet pipeline`'s own server): nothing to hold.
        with accelerator.accelerator_slot(log, "train-0-2") as held:
            assert held is False
        client.upsert_global_concurrency_limit_by_name(accelerator.ACCELERATOR_LIMIT,
                                                       accelerator.ACCELERATOR_SLOTS)
    first, holding, release = Lines(), threading.Event(), threading.Event()

    def first_run() -> None:
        with accelerator.accelerator_slot(first, "train-0-2") as held:
            assert held is True
            holding.set()
            release.wait(60)

    try:
        thread = threading.Thread(target=first_run)
        thread.start()
        assert holding.wait(60)
        assert "holding this host's accelerator" in first.info_lines[-1]
        with pytest.raises(TimeoutError):  # the slot is taken
            with concurrency(accelerator.ACCELERATOR_LIMIT, timeout_seconds=SLOT_TIMEOUT_S):
                pass
        # A second run waits, says so once, and a SIGTERM (its run cancelled) ends the wait.
        second = Lines()
        threading.Timer(2 * SLOT_TIMEOUT_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(StageCancelled, match="^stage evaluate: stopped by SIGTERM while "
                                                 "waiting for this host's accelerator"):
            with accelerator.accelerator_slot(second, "evaluate"):
                pass
        assert time.monotonic() - started < accelerator.WAIT_POLL_S + 2 * SLOT_TIMEOUT_S
        assert [line for line in second.info_lines if "waiting" in line] == second.info_lines
        assert len(second.info_lines) == 1
        release.set()
        thread.join(60)
        # Released at the end of the first run's block: the next run gets it at once.
        third = Lines()
        with accelerator.accelerator_slot(third, "train-0-2") as held:
            assert held is True and len(third.info_lines) == 1
    finally:
        release.set()
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(accelerator.ACCELERATOR_LIMIT)
