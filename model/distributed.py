"""Training past one process: joining JAX's multi-controller runtime and launching local workers.

Owns
- `join`: what `imagenet train --coordinator=HOST:PORT --num_processes=N --process_id=I` does
  before anything touches a JAX backend: `jax.distributed.initialize` with those values, or with
  none of them where a scheduler's environment says the job has several processes
  (`CLUSTER_ENVS`: SLURM's srun, Open MPI's mpirun), so JAX's own cluster detection fills them
  in. One process and no scheduler: nothing to join. With flags or a scheduler's environment
  alike (the latter read through JAX's detection: `scheduler_params`), model/peers.py's
  rendezvous runs first (a missing process is named in one line after `timeout_s`, 60 s by
  default: --join_timeout) and its watchdog stays beside JAX for the run (a process that fails
  or dies stops the others at once, with one line). JAX's coordination service then runs in a
  helper process beside process 0 that outlives it by a few seconds, so process 0 dying
  outright (kill -9, a segfault) never lets the others' JAX clients abort natively first.
- the CPU collectives: XLA's CPU client reduces across processes with gloo over TCP
  (`jax_cpu_collectives_implementation`, gloo by default in jax 0.10; "mpi" is the other
  implementation, chosen with JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi). GPU processes reduce
  with NCCL, TPU ones over ICI: nothing to choose there.
- `run_local_processes`: N processes of `model.train.train` on this host joined over
  127.0.0.1 (the pipeline's `processes` parameter). Process 0's log lines, progress, test
  outputs and result come back as JSON lines on its stdout; the others' stderr is kept for the
  error message. One failing process stops the rest (they would wait in a collective).

What each process reads, who logs and who snapshots is model/solve.py's Solver.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from data.errors import ImagenetError
from model import peers

# Schedulers whose environment JAX's cluster detection reads (jax/_src/clusters/): name ->
# (variables it needs, the one holding the process count).
CLUSTER_ENVS: dict[str, tuple[tuple[str, ...], str]] = {
    "SLURM": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID"), "SLURM_NTASKS"),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                 "OMPI_COMM_WORLD_SIZE"),
}
CPU_COLLECTIVES = "gloo"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"
# Seconds a process waits for all the others to join (--join_timeout; jax.distributed's own
# default is 300 and ends in a native abort).
JOIN_TIMEOUT_S = 60
LOCALHOST = "127.0.0.1"
MAX_PORT = 65535
# After a failure or cancellation: seconds the other processes get to stop (a SIGTERM makes
# them snapshot) before they are killed.
STOP_GRACE_S = 60
# Poll interval of the watcher that notices a failed process.
WATCH_INTERVAL_S = 0.5
# Marks process 0's event lines on its stdout (gloo writes there too).
EVENT_PREFIX = "@imagenet-event "
# Characters of a failed process's stderr quoted in the error.
STDERR_TAIL = 2000
# This process's peer watchdog once joined with explicit flags (model/peers.py).
_WATCHDOG: peers.Watchdog | None = None


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The scheduler (a CLUSTER_ENVS name) whose environment describes several processes."""
    for name, (needed, count_var) in CLUSTER_ENVS.items():
        if all(v in environ for v in needed):
            try:
                if int(environ[count_var]) > 1:
                    return name
            except ValueError:
                raise ImagenetError(f"{count_var}={environ[count_var]!r} is not a process "
                                    "count") from None
    return None


def parse_coordinator(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port) -> (host, port), or one line saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise ImagenetError(f"--coordinator={text!r}: expected HOST:PORT, e.g. "
                            f"{LOCALHOST}:12355 (process 0's host and a free port)")
    return host, int(port)


def join(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, environ: Mapping[str, str] = os.environ,
         timeout_s: int = JOIN_TIMEOUT_S) -> int:
    """Join this training's processes (jax.distributed.initialize); returns the process count
    (1: nothing joined). Call it before any JAX computation. The coordinator may also come
    from JAX_COORDINATOR_ADDRESS, as jax.distributed reads it."""
    if coordinator is None and num_processes is not None:
        coordinator = environ.get(COORDINATOR_ENV)
    given = {"--coordinator": coordinator, "--num_processes": num_processes,
             "--process_id": process_id}
    if all(v is None for v in given.values()):
        cluster = detected_cluster(environ)
        if cluster is None:
            return 1
        what = f"{cluster}'s environment"
        params = scheduler_params(timeout_s)
        if params is None:  # this JAX cannot tell us: its own join, without our rendezvous
            return _initialize(None, None, None, environ, timeout_s, what)
        coordinator, num_processes, process_id = params
        if num_processes == 1:
            return 1
        return _join_checked(coordinator, num_processes, process_id, environ, timeout_s, what,
                             launcher=cluster)
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ImagenetError(f"{', '.join(missing)} missing: --coordinator, --num_processes and "
                            "--process_id go together (one command per process, all with the "
                            "same --coordinator and --num_processes)")
    parse_coordinator(coordinator)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ImagenetError(f"--process_id={process_id} with --num_processes={num_processes}: "
                            "ids run from 0 to num_processes - 1")
    if num_processes == 1:
        return 1
    return _join_checked(coordinator, num_processes, process_id, environ, timeout_s,
                         f"coordinator {coordinator}")


def scheduler_params(timeout_s: int) -> tuple[str, int, int] | None:
    """(coordinator, process count, process id) as jax.distributed.initialize would work them
    out from SLURM's or Open MPI's environment (JAX's own cluster detection, so the coordinator's
    host and port are the ones JAX would use), or None when this JAX cannot say."""
    try:
        from jax._src.clusters import ClusterEnv  # what jax.distributed.initialize calls
        coordinator, count, pid, _ = ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, timeout_s)
    except Exception:  # moved or changed in another JAX: fall back to JAX's own join
        return None
    if coordinator is None or count is None or pid is None:
        return None
    return str(coordinator), int(count), int(pid)


def _join_checked(coordinator: str, num_processes: int, process_id: int,
                  environ: Mapping[str, str], timeout_s: int, what: str,
                  launcher: str | None = None) -> int:
    """Our rendezvous first (a missing process is named in one line), its watchdog for the run,
    then JAX's join with the coordination service in the helper beside process 0."""
    global _WATCHDOG
    if timeout_s <= 0:
        raise ImagenetError(f"--join_timeout={timeout_s}: must be a positive number of seconds")
    host, port = parse_coordinator(coordinator)
    links, service = peers.rendezvous(host, port, num_processes, process_id, timeout_s,
                                      launcher=launcher)
    _WATCHDOG = peers.Watchdog(links, process_id, num_processes, service)
    # process 0's JAX starts its own service as always, but where nobody connects: the one
    # every client joins is the helper's, on the coordinator's port (model/peers.py)
    return _initialize(coordinator, num_processes, process_id, environ, timeout_s, what,
                       bind=peers.DECOY_BIND if service is not None else None)


def report_failure(message: str) -> None:
    """This process ends in an error: the other processes stop at once, naming it (model/peers.py);
    nothing to do with one process."""
    if _WATCHDOG is not None:
        _WATCHDOG.report_failure(message)


def _initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
                environ: Mapping[str, str], timeout_s: int, what: str,
                bind: str | None = None) -> int:
    import jax
    if COLLECTIVES_ENV not in environ:
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=peers.JAX_HEARTBEAT_S,
                                   shutdown_timeout_seconds=peers.JAX_SHUTDOWN_S,
                                   coordinator_bind_address=bind)
    except Exception as err:  # jax raises RuntimeError, ValueError or its own runtime errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImagenetError(f"could not join the training processes ({what}): {first}; "
                            "start every process within "
                            f"{timeout_s} s, with the same --coordinator (process 0's host) "
                            "and --num_processes, before anything else uses JAX") from None
    return jax.process_count()


def process_index() -> int:
    """This process's id among the joined ones (0 when alone)."""
    import jax
    return jax.process_index()


# ----------------------------------------------------------------------------- local processes

def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_local_processes(processes: int, solver: str, *, workdir: str | os.PathLike,
                        snapshot: str | None = None, weights: str | Sequence[str] | None = None,
                        devices: str | Sequence[int] | None = None,
                        stop_at_iter: int | None = None, precision: str = "fp32",
                        workers: int | None = None,
                        log: Callable[[str], None] | None = None,
                        on_progress: Callable[[int, int], None] | None = None,
                        on_test: Callable[[int, dict[str, float]], None] | None = None,
                        env: Mapping[str, str] | None = None, pin_cpus: bool = False) -> Any:
    """`model.train.train` in `processes` local processes joined over 127.0.0.1; returns
    process 0's TrainResult. The callbacks receive process 0's events, as in train(); if one
    raises (a cancelled task), every process is asked to stop (they snapshot first).
    pin_cpus: each process runs on its own share of this process's CPUs (so XLA sizes its
    thread pool to that share instead of every process using all cores)."""
    from model.train import TrainResult
    if processes < 1:
        raise ImagenetError(f"processes must be >= 1, got {processes}")
    # Every process reads the same --weights file(s): the copied layers start equal everywhere.
    weights = [weights] if isinstance(weights, str) else list(weights) if weights else None
    spec = {"solver": str(solver), "workdir": str(workdir), "snapshot": snapshot,
            "weights": weights,
            "devices": devices, "stop_at_iter": stop_at_iter, "precision": precision,
            "workers": workers,
            "coordinator": f"{LOCALHOST}:{free_port()}", "num_processes": processes,
            "parent": os.getpid(), "cpus": None}
    shares = cpu_shares(processes) if pin_cpus else [None] * processes
    with tempfile.TemporaryDirectory(prefix="imagenet-procs-") as tmp:
        errs = [open(Path(tmp) / f"stderr{i}.txt", "w+") for i in range(processes)]
        procs = [subprocess.Popen(
            [sys.executable, "-m", "model.distributed",
             json.dumps({**spec, "process_id": i, "cpus": shares[i]})],
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL, stderr=errs[i],
            text=True, env=dict(os.environ if env is None else env)) for i in range(processes)]
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        # the reader drains process 0's stdout even after a failure here: a full pipe would
        # block process 0, and the others with it in their next collective
        threading.Thread(target=_read_events, args=(procs[0].stdout, events),
                         daemon=True).start()
        done = threading.Event()
        threading.Thread(target=_watch, args=(procs, done), daemon=True).start()
        try:
            result, user_error = _dispatch(events, log, on_progress, on_test)
            codes = [p.wait() for p in procs]
        except BaseException:
            _stop(procs)  # cancelled (or a callback failed): all snapshot and stop
            raise
        finally:
            done.set()
            tails = []
            for f in errs:
                f.seek(0)
                tails.append(f.read()[-STDERR_TAIL:])
                f.close()
    if user_error is not None:
        raise ImagenetError(user_error)
    # the process that failed first, not those its watchdog stopped (model/peers.py)
    bad = sorted(((i, c) for i, c in enumerate(codes) if c != 0),
                 key=lambda ic: ic[1] == peers.EXIT_PEER_LOST)
    if bad or result is None:
        i, code = bad[0] if bad else (0, codes[0])
        raise RuntimeError(f"training process {i} of {processes} exited with status {code}: "
                           f"{tails[i].strip() or '(no output)'}")
    result["last_snapshot"] = tuple(result["last_snapshot"]) if result["last_snapshot"] else None
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return TrainResult(**result)


def cpu_shares(processes: int) -> list[list[int]]:
    """This process's CPUs cut into `processes` contiguous, equal shares."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < processes:
        raise ImagenetError(f"cannot pin {processes} processes to {len(cpus)} CPUs")
    size = len(cpus) // processes
    return [cpus[i * size:(i + 1) * size] for i in range(processes)]


def _read_events(stream: TextIO, events: "queue.Queue[dict[str, Any] | None]") -> None:
    """Process 0's event lines (other output, such as gloo's connection notes, is skipped);
    None at the end."""
    try:
        for line in stream:
            if line.startswith(EVENT_PREFIX):
                events.put(json.loads(line[len(EVENT_PREFIX):]))
    finally:
        events.put(None)


def _dispatch(events: "queue.Queue[dict[str, Any] | None]",
              log: Callable[[str], None] | None,
              on_progress: Callable[[int, int], None] | None,
              on_test: Callable[[int, dict[str, float]], None] | None
              ) -> tuple[dict[str, Any] | None, str | None]:
    """Hand process 0's events to the callbacks; returns its result and its user error."""
    result: dict[str, Any] | None = None
    user_error: str | None = None
    while (event := events.get()) is not None:
        kind = event["event"]
        if kind == "log" and log is not None:
            log(event["line"])
        elif kind == "progress" and on_progress is not None:
            on_progress(event["iter"], event["max_iter"])
        elif kind == "test" and on_test is not None:
            on_test(event["iter"], event["outputs"])
        elif kind == "result":
            result = event["result"]
        elif kind == "error":
            user_error = event["message"]
    return result, user_error


def _watch(procs: Sequence[subprocess.Popen], done: threading.Event) -> None:
    """One process failing leaves the others waiting in a collective: stop them."""
    while not done.is_set():
        if any(p.poll() not in (None, 0) for p in procs):
            _stop(procs)
            return
        time.sleep(WATCH_INTERVAL_S)


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stop_with_parent(parent: int) -> None:
    """A worker whose launcher died without stopping it (killed, say) stops too: SIGTERM to
    itself is the Solver's stop request (all processes snapshot and stop)."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(spec: dict[str, Any], out: TextIO) -> int:
    """One of run_local_processes' processes: join, train, report (process 0) as JSON lines."""
    if spec["cpus"]:
        os.sched_setaffinity(0, spec["cpus"])  # before XLA sizes its thread pools
    threading.Thread(target=_stop_with_parent, args=(spec["parent"],), daemon=True).start()
    join(spec["coordinator"], spec["num_processes"], spec["process_id"])
    from model.train import train

    def emit(event: dict[str, Any]) -> None:
        if process_index() == 0:
            out.write(EVENT_PREFIX + json.dumps(event) + "\n")
            out.flush()

    try:
        result = train(spec["solver"], snapshot=spec["snapshot"], weights=spec.get("weights"),
                       devices=spec["devices"],
                       stop_at_iter=spec["stop_at_iter"], workdir=spec["workdir"],
                       precision=spec["precision"], workers=spec.get("workers"),
                       log=lambda line: emit({"event": "log", "line": line}),
                       on_progress=lambda it, total: emit(
                           {"event": "progress", "iter": it, "max_iter": total}),
                       on_test=lambda it, outs: emit(
                           {"event": "test", "iter": it, "outputs": outs}))
    except ImagenetError as err:
        report_failure(str(err))
        emit({"event": "error", "message": str(err)})
        print(f"process {spec['process_id']}: error: {err}", file=sys.stderr)
        return 1
    emit({"event": "result", "result": dataclasses.asdict(result)})
    return 0


if __name__ == "__main__":
    sys.exit(_worker(json.loads(sys.argv[1]), sys.stdout))
