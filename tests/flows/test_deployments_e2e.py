"""End to end through a real Prefect server, as an operator uses it: `make up`'s code path
(flows.services: server on 127.0.0.1, process pool, `prefect deploy --all`, worker), then
`prefect deployment run ... --watch` on the deployments of prefect.yaml, reading from the API what
each run did. One server for every check (it takes 7-32 s to start); its own PREFECT_HOME and a
free port; everything is stopped after.

1. `make up` again: refused, nothing touched.
2. imagenet/mini-pipeline with --param overrides (a data root of the test's, the tiny mini, the
   tiny net): the presets combine with them; every stage ran; each progress bar ends at 100%
   with at most one update per 2 s before that; --watch ends with the top-1/top-5 line.
3. imagenet/convert-lmdb --param data_root=D (+ the resize used) reruns exactly the two
   conversions, while (7) the same deployment on an empty data root fails in one line naming the
   stage and creates no folder; imagenet/train with force: [train] trains from iteration 0 with
   the old snapshots moved aside (said in the log), then evaluates.
5. `make up`'s concurrency limit: while a second mini-pipeline trains for long, another training
   run says it waits for the host's accelerator and starts no training task; cancelled, it ends
   Cancelled at once, saying it was waiting.
4. `make down` then: the training run is cancelled through the API, snapshots, and ends
   Cancelled (never left Running), then the worker and the server stop.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from flows import services
from tasks.accelerator import ACCELERATOR_LIMIT
from tasks.stage import PROGRESS_EVENT

pytestmark = pytest.mark.slow
WATCH_TIMEOUT_S = 420
# Long enough that `make down` finds it training (the tiny net does ~100 iterations a second).
CANCELLED_MAX_ITER = 200_000
CANCELLED_BASE_LR = 1e-5
# One log line per CANCELLED_DISPLAY iterations: alone, the run trains at up to ~1,100
# iterations a second, and it trains on while step 5 waits.
CANCELLED_DISPLAY = 500
EVENTS_PAGE = 50  # the most /events/filter returns at once
# How long the waiting run must stay without a training task run: without the limit its
# first segment would start within a second.
SLOT_WAIT_CHECK_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_deployment(name: str, params: dict, env: dict, *, watch: bool = True):
    """`prefect deployment run NAME [--watch] --param k=v ...` (each value as JSON); a Popen."""
    argv = [services._prefect(), "deployment", "run", name]
    if watch:
        argv += ["--watch", "--watch-timeout", str(WATCH_TIMEOUT_S)]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value)}"]
    return subprocess.Popen(argv, cwd=services.PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=WATCH_TIMEOUT_S + 60)
    return proc.returncode, out


def _flow_run_id(watch_output: str) -> str:
    return next(line.split("UUID:")[1].strip() for line in watch_output.splitlines()
                if "UUID:" in line)


def _task_runs(api, flow_run_id: str) -> dict[str, dict]:
    runs = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}},
                                               "limit": 200}).json()
    return {r["name"]: r for r in runs}


def _logs(api, flow_run_id: str) -> list[str]:
    logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                          "limit": 200, "sort": "TIMESTAMP_ASC"}).json()
    return [log["message"] for log in logs]


def _events(api, name: str, flow_run_id: str) -> list[dict]:
    """Every event `name` about the flow run (the API pages them by EVENTS_PAGE)."""
    page = api.post("/events/filter", json={"filter": {
        "event": {"name": [name]}, "any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}},
        "limit": EVENTS_PAGE}).json()
    events = list(page["events"])
    while page.get("next_page"):
        page = api.get(page["next_page"]).json()
        events += page["events"]
    return events


def _eventually(fetch, ok, timeout: float = 30.0):
    """The server records task runs and logs from events, a moment after they happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_operator_path_through_a_real_server(tmp_path, tiny_solver):
    import httpx

    port = _free_port()
    run_dir, home = tmp_path / "run", tmp_path / "prefect-home"
    env = services.service_env(port, home)
    root = tmp_path / "mini-root"
    tiny = {"data_root": str(root), "sources": {"train": "mini:tiny", "val": "mini:tiny",
                                                "aux": "mini:tiny"},
            "resize_height": 16, "resize_width": 16, "solver": str(tiny_solver)}
    t0 = time.monotonic()

    def mark(what: str) -> None:  # reported with -s, never asserted
        print(f"[e2e] {time.monotonic() - t0:6.1f} s  {what}")

    try:
        services.up(port=port, run_dir=run_dir, prefect_home=home)
        mark("server up, pool, deploy --all, worker started")
        api = httpx.Client(base_url=services.api_url(port), timeout=30)
        pids = {name: (run_dir / f"{name}.pid").read_text() for name in services.SERVICES}

        # 4a. A second `make up` says so and touches nothing.
        with pytest.raises(services.AlreadyUp, match="already up"):
            services.up(port=port, run_dir=run_dir, prefect_home=home)
        assert {name: (run_dir / f"{name}.pid").read_text() for name in services.SERVICES} == pids
        assert api.get("/health").json() is True

        # 2. mini-pipeline: its presets (64x64, alexnet_mini, mini) meet the run's overrides.
        presets = {d["name"]: d["parameters"]
                   for d in api.post("/deployments/filter", json={}).json()}
        assert set(presets) == {"mini-pipeline", "full-pipeline", "convert-lmdb", "train",
                                "classify", "own-images"}
        assert presets["mini-pipeline"]["sources"] == {"train": "mini", "val": "mini",
                                                       "aux": "mini"}
        # (7, started now to run alongside: convert-lmdb on a data root that holds nothing)
        empty = tmp_path / "nothing-here"
        failing = _run_deployment("imagenet/convert-lmdb", {"data_root": str(empty)}, env)
        code, watched = _finish(_run_deployment("imagenet/mini-pipeline", tiny, env))
        assert code == 0, watched[-3000:]
        mark(f"imagenet/mini-pipeline finished; --watch printed {len(watched.splitlines())} lines")
        mini_run = _flow_run_id(watched)
        finished = " ".join(watched[watched.rindex("imagenet.pipeline.finished"):].split())
        assert "pipeline finished: top-1 = " in finished and "top-5 = " in finished
        tasks = _eventually(lambda: _task_runs(api, mini_run), lambda t: "evaluate" in t)
        assert {"mini-ilsvrc12", "download-train", "convert-val", "mean", "train-0-2",
                "train-4-6", "evaluate"} <= set(tasks)
        assert {t["state_name"] for t in tasks.values()} == {"Completed"}
        assert (root / "lmdb" / "ilsvrc12_train_lmdb" / "data.mdb").is_file()
        artifacts = api.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [mini_run]}}}).json()
        assert all(a["data"] == 100 for a in artifacts if a["type"] == "progress")
        assert {"imagenet-summary", "imagenet-test-metrics"} <= {a["key"] for a in artifacts}
        # each stage that ran has a card titled by it; --watch reads its progress in words
        assert {a["key"] for a in artifacts if a["type"] == "progress"} == {
            f"progress-{name}" for name in tasks}
        lines = [e["resource"]["prefect.resource.name"]
                 for e in _events(api, PROGRESS_EVENT, mini_run)]
        assert lines and all(re.match(r"^[a-z0-9-]+: \d+%", line) for line in lines), lines
        assert "prefect.artifact.updated" not in watched
        assert any(line.startswith("convert-train: 100%") for line in lines), lines

        # 3 and 7. convert-lmdb on the pipeline's data root, and on one that holds nothing.
        code, watched = _finish(_run_deployment("imagenet/convert-lmdb", {
            k: tiny[k] for k in ("data_root", "resize_height", "resize_width")}, env))
        assert code == 0, watched[-3000:]
        tasks = _eventually(lambda: _task_runs(api, _flow_run_id(watched)), lambda t: len(t) >= 2)
        assert {name: t["state_name"] for name, t in tasks.items()} == {
            "convert-train": "Completed", "convert-val": "Completed"}
        code, watched = _finish(failing)
        assert code == 1
        # --watch shows the cause, not just "Failed" (as an event: it prints no logs)
        shown = " ".join(watched[watched.rindex("imagenet.pipeline.failed"):].split())
        assert "* stage convert-train: stage input " in shown
        failed = api.get(f"/flow_runs/{_flow_run_id(watched)}").json()
        message = failed["state"]["message"]
        assert failed["state_name"] == "Failed" and "\n" not in message
        assert message.startswith("stage convert-train: ") and "does not exist" in message
        assert not empty.exists()
        mark("imagenet/convert-lmdb: rebuilt the two LMDBs; on an empty root failed in one line")

        # 3. train with force: [train] trains again from iteration 0, the old snapshots aside.
        code, watched = _finish(_run_deployment("imagenet/train", {
            "data_root": str(root), "solver": str(tiny_solver), "force": ["train"]}, env))
        assert code == 0, watched[-3000:]
        train_run = _flow_run_id(watched)
        tasks = _eventually(lambda: _task_runs(api, train_run), lambda t: "evaluate" in t)
        assert {n: t["state_name"] for n, t in tasks.items() if n != "evaluate"} == {
            "train-0-2": "Completed", "train-2-4": "Completed", "train-4-6": "Completed"}
        # Retrained weights are bit for bit the same on CPU: their evaluation may come from the
        # cache (same weights digest), and it is there either way.
        assert tasks["evaluate"]["state_type"] == "COMPLETED"
        moved = _eventually(lambda: [m for m in _logs(api, train_run) if "force train: moved" in m],
                            bool)
        assert moved and "training from iteration 0" in moved[0]
        assert len(list(root.glob("training/*/previous-*/snap_iter_6.caffemodel"))) == 1
        mark("imagenet/train with force: [train] retrained from 0 and evaluated")

        # 4. A mini-pipeline on a data root of its own whose training lasts until `make down`
        # cancels it at the end (started after 3: it holds the accelerator's slot meanwhile).
        slow = tmp_path / "slow_solver.prototxt"  # never diverges; few log lines and tests
        slow.write_text(tiny_solver.read_text().replace(
            'net: "train_val.prototxt"', f'net: "{tiny_solver.parent / "train_val.prototxt"}"')
            .replace("base_lr: 0.01", f"base_lr: {CANCELLED_BASE_LR}")
            .replace("display: 1\n", f"display: {CANCELLED_DISPLAY}\n")
            .replace("test_interval: 2\n", f"test_interval: {CANCELLED_MAX_ITER}\n"))
        long_root = tmp_path / "long-root"
        code, out = _finish(_run_deployment("imagenet/mini-pipeline", {
            **tiny, "data_root": str(long_root), "solver": str(slow),
            "max_iter": CANCELLED_MAX_ITER, "snapshot_interval": CANCELLED_MAX_ITER}, env,
            watch=False))
        assert code == 0, out
        busy = _flow_run_id(out)

        _eventually(lambda: _logs(api, busy),
                    lambda logs: any(f"] Iteration {CANCELLED_DISPLAY} " in m for m in logs),
                    timeout=WATCH_TIMEOUT_S)
        mark("a long training run is training")

        # 5. Meanwhile another training on this host waits for the slot `make up` created.
        limits = {c["name"]: c for c in api.post("/v2/concurrency_limits/filter", json={}).json()}
        slot = limits[ACCELERATOR_LIMIT]
        assert slot["limit"] == 1 and slot["active"] and slot["active_slots"] == 1
        code, out = _finish(_run_deployment("imagenet/train", {
            "data_root": str(root), "solver": str(tiny_solver), "force": ["train"]}, env,
            watch=False))
        assert code == 0, out
        waiting = _flow_run_id(out)
        logs = _eventually(lambda: _logs(api, waiting),
                           lambda logs: any("waiting for this host's accelerator" in m
                                            for m in logs), timeout=WATCH_TIMEOUT_S)
        assert any(ACCELERATOR_LIMIT in m for m in logs), logs
        time.sleep(SLOT_WAIT_CHECK_S)
        assert "train-0-2" not in _task_runs(api, waiting)
        assert api.get(f"/flow_runs/{waiting}").json()["state_name"] == "Running"
        assert api.get(f"/flow_runs/{busy}").json()["state_name"] == "Running"
        mark("a second training waits for the accelerator's slot")
        # Cancelled while it waits (as the README says: `prefect flow-run cancel ID`), it ends
        # at once with its own message; the first run trains on.
        done = subprocess.run([services._prefect(), "flow-run", "cancel", waiting], env=env,
                              cwd=services.PROJECT_ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        stopped = _eventually(lambda: api.get(f"/flow_runs/{waiting}").json(),
                              lambda run: run["state_name"] == "Cancelled", timeout=60)
        assert "while waiting for this host's accelerator" in stopped["state"]["message"], \
            stopped["state"]
        assert api.get(f"/flow_runs/{busy}").json()["state_name"] == "Running"
        mark("the waiting run cancelled")

        # 4. `make down` while a run trains: it first cancels the runs in flight through the
        # API (services.cancel_in_flight, read back here before the server stops): snapshot,
        # then Cancelled, within the worker's grace period.
        started = time.time()
        assert busy in services.cancel_in_flight(services.api_url(port))
        mark(f"make down's cancel returned after {time.time() - started:.1f} s")
        run = api.get(f"/flow_runs/{busy}").json()
        assert run["state_name"] == "Cancelled", run["state"]
        # the run's own message, kept over the worker's "Flow run was cancelled successfully."
        assert "stopped by SIGTERM at iteration" in run["state"]["message"]
        states = api.get("/flow_run_states/", params={"flow_run_id": busy}).json()
        own = next(st for st in states if st["type"] == "CANCELLED")
        ended = datetime.fromisoformat(own["timestamp"]).timestamp()
        assert ended - started < services.CANCEL_GRACE_S, ended - started
        it = int(run["state"]["message"].split("at iteration ")[1].split()[0])
        assert list(long_root.glob(f"training/*/snap_iter_{it}.solverstate"))
    finally:
        services.down(run_dir)
    assert not (run_dir / "server.pid").exists() and not (run_dir / "worker.pid").exists()
