"""`make up` / `make down`: a local Prefect server, the process work pool, the deployments of
prefect.yaml and a worker, with PIDs and logs under a project-local folder (.run/).

    python -m flows.services up [--port 4200] [--run-dir .run]
    python -m flows.services down [--run-dir .run]

`up` when this checkout's services are already running (or another program holds the port)
says so, exits non-zero and touches nothing. `down` first cancels the flow runs in flight
through the API (the worker stops each with SIGTERM: a training segment snapshots, and the run
ends *Cancelled*, never left *Running* on the next `make up`), waits for them to end, then stops
the worker and the server.

Each long-lived process starts in its own session (process group): PREFECT_NOTES measured that a
worker started with `&` from a script ignores one SIGTERM, and that a second SIGTERM orphans the
running flow; signalling the whole group stops the worker and its flow subprocess together.
The server listens on 127.0.0.1 only and telemetry is off (flows.prefect_env).

Everything said to the server goes through Prefect's own CLI (work pool, deploy) or client
(health, variables, the concurrency limit, cancelling runs). Before deploying, `up` sets the
Prefect variables that prefect.yaml's job_variables.env reads (the jemalloc to preload on this
host, XLA's compilation cache) and the global concurrency limit of 1 on this host's accelerator
(tasks.accelerator), so two training runs never share the host's accelerator(s).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from data.lmdb_io import pid_alive
from flows import allocator, prefect_env

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

PROJECT_ROOT = prefect_env.PROJECT_ROOT
DEFAULT_RUN_DIR = PROJECT_ROOT / ".run"
DEFAULT_PORT = 4200
HOST = "127.0.0.1"
POOL = "imagenet-process"  # the work pool prefect.yaml's deployments name
SERVER_READY_TIMEOUT_S = 180  # 24-32 s measured on a fresh database, under load
STOP_TIMEOUT_S = 20
POLL_S = 0.5
# The worker polls every 2 s instead of 10: a deployment run starts promptly.
WORKER_QUERY_SECONDS = "2"
SERVICES = ("worker", "server")  # stop order: the worker (and its flow runs) first
# `make down` cancels flow runs in these states; the worker gives each CANCEL_GRACE_S
# (Prefect's kill grace period) between SIGTERM and SIGKILL, so we wait a little longer.
IN_FLIGHT_STATES = ["RUNNING", "PENDING", "CANCELLING"]
# Runs waiting for the worker (a deployment run not picked up yet, a paused one) would start on
# the next `make up`: `make down` cancels them at once.
WAITING_STATES = ["SCHEDULED", "PAUSED"]
CANCELLED_BEFORE_START = "Cancelled by `make down` before it started"
# After the last run ends, an open `prefect deployment run --watch` prints the final state and
# keeps listening ~3 s for straggling logs (prefect.events.subscribers.FlowRunSubscriber):
# the server stays up that long, so the watch ends with the state, not a connection traceback.
WATCH_STRAGGLER_S = 5
# How long `make down` waits for the worker's own "cancelled successfully" state, to put the
# run's message back over it (flows/cancel.py): the worker writes it once the flow process has
# exited and its cancellation hook has run, 12 s after the run's own state in one `make down`
# on 2 busy cores.
KEEP_MESSAGE_WAIT_S = 30
CANCEL_GRACE_S = 30
CANCEL_WAIT_S = CANCEL_GRACE_S + 30
API_TIMEOUT_S = 10
FLOW_RUNS_PAGE = 200
CANCELLED_BY_DOWN = "Cancelled by `make down`"
# Prefect variables read by prefect.yaml's job_variables.env when `prefect deploy` runs.
LD_PRELOAD_VARIABLE = "imagenet_ld_preload"
JAX_CACHE_VARIABLE = "imagenet_jax_cache_dir"


class AlreadyUp(RuntimeError):
    """`make up` found its services (or something else) already there: nothing was touched."""


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def service_env(port: int, prefect_home: Path | None = None) -> dict[str, str]:
    """The environment of every Prefect command here: API pinned (never a silent ephemeral
    server), project-local home, telemetry off, no prompts."""
    env = dict(os.environ)
    env.pop("PREFECT_PROFILE", None)
    home = Path(prefect_home or prefect_env.PREFECT_HOME)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_SECONDS,
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": prefect_env.EPHEMERAL_STARTUP_TIMEOUT_S,
        "PYTHONUNBUFFERED": "1",
        # prefect.yaml's pull step stores {{ $PWD }} at deploy time: make it the project root
        # whatever folder `make up` (or a test) was started from.
        "PWD": str(PROJECT_ROOT),
    })
    return env


def _prefect() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def _start(name: str, argv: list[str], run_dir: Path, env: dict[str, str]) -> int:
    log = open(run_dir / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(run_dir, name).write_text(str(proc.pid))
    return proc.pid


@contextmanager
def client(url: str, timeout: float = API_TIMEOUT_S) -> Iterator[SyncPrefectClient]:
    """Prefect's synchronous client for the server at `url` (whatever PREFECT_API_URL says)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), \
            get_client(httpx_settings={"timeout": timeout}, sync_client=True) as api:
        yield api


def wait_healthy(port: int, timeout: float = SERVER_READY_TIMEOUT_S, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(f"the Prefect server (pid {pid}) exited; see its log")
        # A fresh client each time: one that has connected once retries refused connections.
        with client(api_url(port), timeout=2) as api:
            if api.api_healthcheck() is None:
                return
        time.sleep(POLL_S)
    raise TimeoutError(f"the Prefect server on port {port} was not healthy after {timeout:.0f} s")


def deploy_variables(prefect_home: Path) -> dict[str, str | None]:
    """The Prefect variables prefect.yaml's job_variables.env reads, for this host: None
    deletes one (no jemalloc here: LD_PRELOAD stays empty)."""
    return {LD_PRELOAD_VARIABLE: allocator.find_jemalloc(),
            JAX_CACHE_VARIABLE: str(prefect_home / prefect_env.JAX_CACHE_DIRNAME)}


def configure_server(url: str, prefect_home: Path) -> None:
    """Set the deployments' variables and the accelerator's concurrency limit (both are upserts:
    a rerun of `make up` on the same database changes nothing else)."""
    from prefect.client.schemas.actions import (GlobalConcurrencyLimitUpdate, VariableCreate,
                                                VariableUpdate)
    from prefect.exceptions import ObjectNotFound

    from tasks.accelerator import ACCELERATOR_LIMIT, ACCELERATOR_SLOTS

    with client(url) as api:
        for name, value in deploy_variables(prefect_home).items():
            if value is None:
                try:
                    api.delete_variable_by_name(name)
                except ObjectNotFound:
                    pass
            elif api.read_variable_by_name(name) is None:
                api.create_variable(VariableCreate(name=name, value=value))
            else:
                api.update_variable(VariableUpdate(name=name, value=value))
        api.upsert_global_concurrency_limit_by_name(ACCELERATOR_LIMIT, ACCELERATOR_SLOTS)
        # `up` runs only while this checkout's services are down, so no run of this host holds
        # the slot now: one still counted was held by a run that ended with the previous
        # services. A server killed outright forgets its leases (kept in memory), so nothing
        # would ever give that slot back, and every later training would wait for it.
        stale = api.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT).active_slots
        if stale:
            api.update_global_concurrency_limit(ACCELERATOR_LIMIT,
                                                GlobalConcurrencyLimitUpdate(active_slots=0))
            print(f"freed {stale} slot(s) of {ACCELERATOR_LIMIT} held by a run that ended "
                  "with the previous server")


def _run(argv: list[str], env: dict[str, str], run_dir: Path, what: str) -> None:
    with open(run_dir / "setup.log", "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        done = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); see {run_dir / 'setup.log'}")


def port_in_use(port: int) -> bool:
    """Whether something already listens on HOST:port."""
    with socket.socket() as s:
        s.settimeout(POLL_S)
        return s.connect_ex((HOST, port)) == 0


def check_not_up(port: int, run_dir: Path) -> None:
    """AlreadyUp (one line, nothing touched) when this run dir's services are alive or the port
    is taken."""
    running = [(name, pid) for name in SERVICES
               if (pid := _read_pid(run_dir, name)) is not None and pid_alive(pid)]
    if running:
        url = (run_dir / "api_url").read_text().strip() if (run_dir / "api_url").is_file() else "?"
        names = ", ".join(f"{name} pid {pid}" for name, pid in running)
        raise AlreadyUp(f"already up ({names}; API {url}); nothing changed. `make down` "
                        "stops them")
    if port_in_use(port):
        raise AlreadyUp(f"port {port} on {HOST} is already in use by another program; nothing "
                        "changed. Stop it, or choose another port: make up PREFECT_PORT=4300")


def up(port: int = DEFAULT_PORT, run_dir: Path = DEFAULT_RUN_DIR, prefect_home: Path | None = None) -> None:
    """Server, pool, deployments, worker. AlreadyUp (touching nothing) when already running."""
    check_not_up(port, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = service_env(port, prefect_home)
    prefect = _prefect()
    print(f"starting the Prefect server on {HOST}:{port} (log: {run_dir / 'server.log'})")
    pid = _start("server", [prefect, "server", "start", "--host", HOST, "--port", str(port)],
                 run_dir, env)
    wait_healthy(port, pid=pid)
    configure_server(api_url(port), Path(env["PREFECT_HOME"]))
    print(f"creating work pool {POOL} and deploying prefect.yaml")
    _run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, run_dir,
         "creating the work pool")
    _run([prefect, "--no-prompt", "deploy", "--all"], env, run_dir, "prefect deploy --all")
    _start("worker", [prefect, "worker", "start", "--pool", POOL, "--type", "process"], run_dir, env)
    (run_dir / "api_url").write_text(api_url(port))
    print(f"Prefect UI: http://{HOST}:{port}   (worker log: {run_dir / 'worker.log'})")
    print(next_commands(port))


def _shown_path(path: Path) -> str:
    """`path` as the user should type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_commands(port: int) -> str:
    """What to type after `make up` (the README's deployment section, in order)."""
    prefect = _prefect()
    shown = _shown_path(Path(prefect)) if os.sep in prefect else prefect
    return "\n".join([
        "next:",
        f"  export PREFECT_API_URL={api_url(port)}",
        f"  {shown} deployment run imagenet/mini-pipeline --watch",
        f"  then open http://{HOST}:{port} (Runs -> the newest imagenet run); "
        "`make down` stops all",
    ])


def _read_pid(run_dir: Path, name: str) -> int | None:
    try:
        return int(_pid_file(run_dir, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _grouppid_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running. Zombies do not count: a leader we
    started ourselves (a test calling up() then down()) stays a zombie until reaped, and
    killpg(pgid, 0) would report it alive."""
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our child
    except ChildProcessError:
        pass
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back on the signal probe
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def _stop_group(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group (the process and its children, e.g. a worker's flow run), then
    SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _grouppid_alive(pid):
                return
            time.sleep(POLL_S)


def _in_flight(api: SyncPrefectClient, states: list[str] = IN_FLIGHT_STATES) -> list[FlowRun]:
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    types = FlowRunFilterStateType(any_=[StateType[name] for name in states])
    return api.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=types)),
                              limit=FLOW_RUNS_PAGE)


def _keep_messages(url: str, run_ids: list[str]) -> None:
    """Put each cancelled run's own message back where the worker wrote its generic one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cancel import keep_cancel_message

    with temporary_settings({PREFECT_API_URL: url}):
        for run_id in run_ids:
            try:
                keep_cancel_message(run_id, KEEP_MESSAGE_WAIT_S)
            except Exception as err:  # noqa: BLE001 - cosmetic: the runs are cancelled
                print(f"could not keep the message of flow run {run_id}: {err}",
                      file=sys.stderr)


def cancel_in_flight(url: str, wait_s: float = CANCEL_WAIT_S) -> list[str]:
    """Ask the server to cancel every Running/Pending flow run and wait until they end (the
    worker SIGTERMs each; a training segment snapshots first). Runs still not finished after
    `wait_s` are forced to Cancelled, so none is left *Running*. Returns their ids."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    with client(url) as api:
        waiting = _in_flight(api, WAITING_STATES)
        for run in waiting:
            print(f"cancelling flow run {run.name} ({run.state_name}, not started)")
            api.set_flow_run_state(run.id, Cancelled(message=CANCELLED_BEFORE_START), force=True)
        runs = _in_flight(api)
        for run in runs:
            if run.state_type != StateType.CANCELLING:
                print(f"cancelling flow run {run.name} ({run.state_name})")
                api.set_flow_run_state(run.id, Cancelling(message=CANCELLED_BY_DOWN))
        deadline = time.monotonic() + wait_s
        left = runs
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S)
            left = _in_flight(api)
        for run in left:
            print(f"flow run {run.name} did not end within {wait_s:.0f} s: marking it "
                  "Cancelled", file=sys.stderr)
            api.set_flow_run_state(run.id, Cancelled(message=CANCELLED_BY_DOWN), force=True)
    if runs:
        _keep_messages(url, [str(run.id) for run in runs])
    if runs or waiting:
        time.sleep(WATCH_STRAGGLER_S)
    return [str(run.id) for run in runs + waiting]


def down(run_dir: Path = DEFAULT_RUN_DIR, cancel_wait_s: float = CANCEL_WAIT_S) -> None:
    """Cancel the flow runs in flight through the API (while the worker is there to stop
    them), then stop the worker and the server."""
    url_file = run_dir / "api_url"
    server = _read_pid(run_dir, "server")
    if url_file.is_file() and server is not None and pid_alive(server):
        try:
            cancel_in_flight(url_file.read_text().strip(), cancel_wait_s)
        except httpx.HTTPError as err:
            print(f"could not cancel the flow runs in flight ({err}); stopping anyway",
                  file=sys.stderr)
    for name in SERVICES:
        pid = _read_pid(run_dir, name)
        if pid is None:
            continue
        if pid_alive(pid):
            print(f"stopping {name} (pid {pid})")
            _stop_group(pid)
        _pid_file(run_dir, name).unlink(missing_ok=True)
    (run_dir / "api_url").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.services", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", DEFAULT_PORT)))
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    args = parser.parse_args(argv)
    prefect_env.configure()  # before this process imports prefect (for its client)
    try:
        if args.action == "up":
            up(args.port, args.run_dir)
        else:
            down(args.run_dir)
    except AlreadyUp as err:
        print(f"make up: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as err:
        print(f"make {args.action}: error: {err}", file=sys.stderr)
        if args.action == "up":
            down(args.run_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
