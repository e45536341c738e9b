"""End to end through a real Prefect server: `make up`'s code path (flows.services: server on
127.0.0.1, process pool, `prefect deploy --all`, worker), then `prefect deployment run
imagenet/full-pipeline --watch` on the tiny mirror, then imagenet/convert-lmdb, reading from the
API which task runs ran. Uses its own PREFECT_HOME and a free port; everything is stopped after.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from flows import services

pytestmark = pytest.mark.slow
WATCH_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, body: dict | None = None):
    req = urllib.request.Request(services.api_url(port) + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _run_deployment(name: str, params: dict, env: dict) -> subprocess.CompletedProcess:
    """`prefect deployment run NAME --watch --param k=v ...` (each value as JSON)."""
    argv = [services._prefect(), "deployment", "run", name, "--watch",
            "--watch-timeout", str(WATCH_TIMEOUT_S)]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value)}"]
    return subprocess.run(argv, cwd=services.PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=WATCH_TIMEOUT_S + 60)


def _latest_flow_run(port: int, deployment: str) -> dict:
    runs = _api(port, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 20})
    deployments = {d["id"]: d["name"] for d in _api(port, "/deployments/filter", {})}
    mine = [r for r in runs if deployments.get(r["deployment_id"]) == deployment]
    return mine[0]


def _task_states(port: int, flow_run_id: str) -> dict[str, str]:
    runs = _api(port, "/task_runs/filter",
                {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    return {r["name"]: r["state"]["name"] for r in runs}


def test_server_deploy_worker_full_pipeline_then_convert_lmdb(tmp_path, make_params):
    port = _free_port()
    run_dir, home = tmp_path / "run", tmp_path / "prefect-home"
    env = services.service_env(port, home)
    params = json.loads(make_params(tmp_path / "root").model_dump_json())
    t0 = time.monotonic()

    def mark(what: str) -> None:  # reported with -s, never asserted
        print(f"[e2e] {time.monotonic() - t0:6.1f} s  {what}")

    try:
        services.up(port=port, run_dir=run_dir, prefect_home=home)
        mark("server up, pool, deploy --all, worker started")
        ui = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<html" in ui.lower()

        full = _run_deployment("imagenet/full-pipeline", params, env)
        assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
        mark("imagenet/full-pipeline finished")
        first = _latest_flow_run(port, "full-pipeline")
        states = _task_states(port, first["id"])
        assert {"download-train", "convert-train", "mean", "train-0-2", "evaluate"} <= set(states)
        assert set(states.values()) == {"Completed"}
        artifacts = _api(port, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}})
        kinds = {a["type"] for a in artifacts}
        assert {"markdown", "table", "progress"} <= kinds
        summary = next(a for a in artifacts if a["key"] == "imagenet-summary")
        assert "data:image/png;base64," in summary["data"]

        # convert-lmdb presets stages/force; the run's --param data_root and resize combine
        # with them (the flow's parameters are top-level).
        deployment = next(d for d in _api(port, "/deployments/filter", {}) if d["name"] == "convert-lmdb")
        assert deployment["parameters"] == {"stages": ["convert"], "force": ["convert"]}
        conv = _run_deployment("imagenet/convert-lmdb", {
            k: params[k] for k in ("data_root", "resize_height", "resize_width")}, env)
        assert conv.returncode == 0, conv.stdout[-3000:] + conv.stderr[-3000:]
        mark("imagenet/convert-lmdb finished")
        second = _latest_flow_run(port, "convert-lmdb")
        assert _task_states(port, second["id"]) == {"convert-train": "Completed",
                                                     "convert-val": "Completed"}
    finally:
        services.down(run_dir)
        mark("make down's stop finished")
    assert not (run_dir / "server.pid").exists()
