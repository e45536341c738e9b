"""Who is there: the startup rendezvous and the peer watchdog of multi-process training.

JAX's own join (jax.distributed.initialize) cannot say which process is missing, and its
failures are native aborts: a process that never starts makes process 0 wait out
`initialization_timeout`, then die in `DEADLINE_EXCEEDED ... RegisterTask` with a C++ stack; a
process that dies mid-run leaves the others in a collective until JAX's 100 s heartbeat, then
aborts them the same way. So before JAX joins, and beside it for the whole run, the processes
keep their own TCP links, a star around process 0 on the coordinator's port (process 0 closes
its listener before JAX's service binds the same port; the links stay):

- `rendezvous`: every process says hello (its id, the process count); process 0 answers "go"
  once all N are there, or, at the deadline, names the missing ids in one line to everyone.
  A process that cannot reach process 0 by the deadline says so, naming the address.
- `Watchdog`: heartbeats both ways every HEARTBEAT_S. A link that closes without "bye" (a
  process killed or crashed: the kernel closes its sockets at once), a "fail" message (a
  process's error) or SILENCE_S without a heartbeat (a host or network lost) makes every other
  process print one line naming the process and what happened, then exit with EXIT_PEER_LOST:
  it cannot finish a step or a snapshot without that process (the collectives need all of
  them). Snapshots are atomic, so the last finished one is what a rerun resumes from.
- A process ending normally says "bye" (at exit); one ending in an error says "fail" with the
  error's line (`report_failure`, or at exit after an uncaught exception) and exits without
  JAX's shutdown barrier, which would otherwise hold it up to 300 s. An error may only echo a
  peer's death (a collective fails at once when a peer dies: gloo's "Connection closed by
  peer"), so a failing process first gives its watchdog SETTLE_S to name a peer that is gone;
  an uncaught exception's traceback waits for that too (sys.excepthook).
- `ServiceHelper`: JAX's coordination service (the gRPC server every JAX client polls for
  errors) normally lives inside process 0. When process 0 dies outright (kill -9, a segfault,
  the OOM killer) it vanishes with it, and each other process's JAX client then aborts natively
  (`client.h:80] Terminating process ...` and a C++ stack) in a race with the watchdog's line
  (seen in 4 of 5 tries). So process 0 hosts that service in a small helper process of its own
  (model/jaxservice.py: jaxlib's get_distributed_runtime_service, as jax.distributed.initialize
  calls it), bound to the coordinator's port once the rendezvous has let go of it. The helper
  lives until process 0 is gone (its stdin, a pipe from process 0, reaches EOF) plus
  SERVICE_GRACE_S: the others' watchdogs see process 0's link close at once and leave first,
  with the one line.
  Process 0's own jax.distributed.initialize still starts the service it always starts, but
  on DECOY_BIND (a public argument, coordinator_bind_address) where nobody connects; its client
  joins the helper's service like every other process. A jaxlib that cannot host the service
  this way (its private API moved) falls back to JAX's own arrangement.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from data.errors import ImagenetError

# Seconds between heartbeats on each link, and of silence before a peer counts as lost (a
# host down or a network cut; a killed process is seen at once, when its link closes).
HEARTBEAT_S = 1.0
SILENCE_S = 20.0
# Exit status of a process stopped because another one failed or went away.
EXIT_PEER_LOST = 3
# Seconds between connection attempts to process 0 while it is not listening yet.
RETRY_S = 0.2
# After the deadline, how long a process that reached process 0 waits for its verdict.
VERDICT_GRACE_S = 10.0
MAX_LINE = 65536
# Seconds a failing process waits for the others to hang up before it exits.
FAIL_GRACE_S = 3.0
# Seconds a failing process gives its watchdog to name a peer that died first (a collective
# fails at once when a peer dies, as the peer's link here closes).
SETTLE_S = 1.0
# Seconds JAX's coordination service outlives process 0 (the others' watchdogs stop them
# within a fraction of a second of process 0's death; their JAX clients would abort natively
# once the service is gone).
SERVICE_GRACE_S = 5.0
# Seconds process 0 waits for its service helper to import jaxlib and bind the port.
SERVICE_START_S = 60.0
# Where process 0's jax.distributed.initialize binds the service nobody uses (port 0: any).
DECOY_BIND = "127.0.0.1:0"
# The helper's program (it imports jaxlib alone).
SERVICE_SCRIPT = Path(__file__).with_name("jaxservice.py")
# jax.distributed.initialize's defaults for the service it would start itself.
JAX_HEARTBEAT_S = 100
JAX_SHUTDOWN_S = 300
# How long process 0 retries a coordinator port still held by an earlier run's service helper
# (it lets go SERVICE_GRACE_S after that run's process 0 ended).
PORT_BUSY_S = SERVICE_GRACE_S + 5.0


class _Link:
    """One JSON-lines TCP connection; send() may be called from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.lock = threading.Lock()
        self.closed = threading.Event()  # the other side hung up (set by the reader)

    def send(self, **msg: Any) -> bool:
        data = (json.dumps(msg) + "\n").encode()
        try:
            with self.lock:
                self.sock.sendall(data)
            return True
        except OSError:
            return False

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None when the link closed; socket.timeout on silence."""
        self.sock.settimeout(timeout)
        try:
            line = self.file.readline(MAX_LINE)
        except (ConnectionError, OSError) as err:
            if isinstance(err, socket.timeout):
                raise
            return None
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return {"kind": "garbage", "text": line[:80].decode(errors="replace")}

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _listen(port: int, deadline: float) -> socket.socket:
    """Process 0's rendezvous listener; a port in use is retried for PORT_BUSY_S (an earlier
    run's service helper lets go of it SERVICE_GRACE_S after its process 0 ended)."""
    busy_until = min(deadline, time.monotonic() + PORT_BUSY_S)
    while True:
        try:
            if socket.has_dualstack_ipv6():
                return socket.create_server(("", port), family=socket.AF_INET6,
                                            dualstack_ipv6=True, reuse_port=False)
            return socket.create_server(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE and time.monotonic() < busy_until:
                time.sleep(RETRY_S)
                continue
            raise ImagenetError(f"process 0 cannot listen on port {port} ({err.strerror}): "
                                "another program (or an earlier training) uses it; choose "
                                "another --coordinator port") from None


class ServiceHelper:
    """JAX's coordination service in a process beside process 0 that outlives it by
    SERVICE_GRACE_S (see the module docstring). Started when the rendezvous starts, so its
    imports overlap the wait; `serve` once the rendezvous listener has let go of the port."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVICE_SCRIPT), self.bind, str(n), str(JAX_HEARTBEAT_S),
             str(JAX_SHUTDOWN_S), str(SERVICE_GRACE_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a terminal's Ctrl-C or a group kill is process 0's
        self.serving = False

    def _line(self, deadline: float) -> str:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
        return out.readline().decode(errors="replace").strip() if ready else "(no answer)"

    def serve(self) -> bool:
        """True: JAX's service runs in the helper on the coordinator's port; False: this jaxlib
        cannot host it there (JAX's own arrangement then); ImagenetError when the port cannot
        be bound."""
        deadline = time.monotonic() + SERVICE_START_S
        said = self._line(deadline)
        if said.startswith("unsupported") or said == "":
            self.stop()
            return False
        if said == "imported":
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"serve\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            said = self._line(deadline)
        if said == "ready":
            self.serving = True
            return True
        self.stop()
        why = said[len("error "):] if said.startswith("error ") else said or "it exited"
        raise ImagenetError(f"process 0 cannot start JAX's coordination service on {self.bind} "
                            f"({why}): another program may have taken port {self.port}; "
                            "choose another --coordinator port")

    def stop(self) -> None:
        """Before serving: end the helper now. (Serving, it ends SERVICE_GRACE_S after this
        process does.)"""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if not self.serving:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def rendezvous(host: str, port: int, n: int, pid: int, timeout_s: float, *,
               launcher: str | None = None) -> tuple[dict[int, _Link], ServiceHelper | None]:
    """All n processes present, or ImagenetError naming who is missing; returns this process's
    links (process 0: one per other process; the others: {0: link}) and, in process 0, the
    helper serving JAX's coordination service on the port (None: JAX's own arrangement).
    `launcher`: the scheduler that started the processes (SLURM, Open MPI), named in the
    errors instead of the flags."""
    coord = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        started = (f"started by {launcher} as a task of this job" if launcher else
                   f"started with --coordinator={coord} --num_processes={n} --process_id=<id>")
        return _gather(port, n, coord, deadline, timeout_s, started)
    link = None
    while link is None:
        try:
            sock = socket.create_connection((host.strip("[]"), port),
                                            timeout=max(0.1, deadline - time.monotonic()))
            link = _Link(sock)
        except OSError as err:
            if time.monotonic() >= deadline:
                runs = (f"{launcher} started process 0" if launcher else
                        f"process 0 runs with --coordinator={coord} --num_processes={n}")
                raise ImagenetError(
                    f"process {pid} of {n}: could not reach process 0 at "
                    f"{'' if launcher else '--coordinator='}{coord} "
                    f"within {timeout_s:g} s ({getattr(err, 'strerror', None) or err}): check "
                    f"that {runs}, that "
                    f"{host} is process 0's host as seen from here and port {port} is open to "
                    "this host (--join_timeout if hosts start slowly)") from None
            time.sleep(RETRY_S)
    link.send(kind="hello", process_id=pid, num_processes=n, host=socket.gethostname())
    try:
        msg = link.recv(max(0.1, deadline - time.monotonic()) + VERDICT_GRACE_S
                        + SERVICE_START_S)
    except socket.timeout:
        msg = {"kind": "abort", "message": f"process {pid} of {n}: no answer from process 0 at "
               f"{coord} within {timeout_s:g} s of reaching it"}
    if msg is None:
        raise ImagenetError(f"process {pid} of {n}: process 0 at {coord} closed the connection "
                            "during startup: see process 0's output")
    if msg.get("kind") != "go":
        link.close()
        raise ImagenetError(str(msg.get("message", msg)))
    return {0: link}, None


def _gather(port: int, n: int, coord: str, deadline: float, timeout_s: float, started: str
            ) -> tuple[dict[int, _Link], ServiceHelper | None]:
    """Process 0's side of the rendezvous."""
    helper = ServiceHelper(port, n)
    links: dict[int, _Link] = {}
    try:
        _collect(_listen(port, deadline), port, links, n, coord, deadline, timeout_s, started)
        try:
            serving = helper.serve()  # the port is free again: JAX's service takes it
        except ImagenetError as err:
            for link in links.values():
                link.send(kind="abort", message=str(err))
            raise
        for link in links.values():
            link.send(kind="go")
        return links, helper if serving else None
    except BaseException:
        helper.stop()
        for link in links.values():
            link.close()
        raise


def _collect(server: socket.socket, port: int, links: dict[int, _Link], n: int, coord: str,
             deadline: float, timeout_s: float, started: str) -> None:
    """Accept the other processes' hellos into links until all n are there (closes server)."""
    try:
        while len(links) < n - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [i for i in range(1, n) if i not in links]
                message = (f"process{'es' if len(missing) > 1 else ''} {_ids(missing)} of {n} "
                           f"did not join within "
                           f"{timeout_s:g} s (coordinator {coord}; joined: "
                           f"{_ids([0, *sorted(links)])}): check that "
                           f"{'each was' if len(missing) > 1 else 'it was'} {started}, and "
                           f"that its host reaches port {port} here (--join_timeout if hosts "
                           "start slowly)")
                for link in links.values():
                    link.send(kind="abort", message=message)
                raise ImagenetError(message)
            server.settimeout(left)
            try:
                sock, _ = server.accept()
            except socket.timeout:
                continue
            link = _Link(sock)
            try:
                hello = link.recv(max(0.1, min(left, VERDICT_GRACE_S)))
            except socket.timeout:
                hello = None
            if not hello or hello.get("kind") != "hello":
                link.close()  # not one of ours (a port scanner, say): ignore it
                continue
            other, their_n = int(hello.get("process_id", -1)), hello.get("num_processes")
            problem = None
            if their_n != n:
                problem = (f"process {other} was started with --num_processes={their_n}, "
                           f"process 0 with {n}: give every process the same value")
            elif not 0 < other < n:
                problem = (f"a process joined with --process_id={other}: ids run from 0 to "
                           f"{n - 1} and 0 is the coordinator")
            elif other in links:
                problem = (f"two processes were started with --process_id={other} (hosts "
                           f"{links[other].host} and {hello.get('host')}): give each its own")
            if problem is not None:
                link.send(kind="abort", message=problem)
                for other_link in links.values():
                    other_link.send(kind="abort", message=problem)
                link.close()
                raise ImagenetError(problem)
            link.host = hello.get("host")  # type: ignore[attr-defined]
            links[other] = link
    finally:
        server.close()  # JAX's coordination service binds this port next


class Watchdog:
    """Heartbeats on the rendezvous links; stops this process, with one line, when a peer
    fails or goes away before saying bye."""

    def __init__(self, links: dict[int, _Link], pid: int, n: int,
                 service: ServiceHelper | None = None) -> None:
        self.links, self.pid, self.n = links, pid, n
        self.service = service  # held for the run: its pipe closing ends the service
        self.left: set[int] = set()
        self.failed = False
        self._stop = threading.Event()
        self._lost = threading.Event()  # a reader thread is ending this process
        self._decide = threading.Lock()  # one verdict: a peer lost, or this process failed
        self._settled = False
        for other, link in links.items():
            threading.Thread(target=self._read, args=(other, link), daemon=True,
                             name=f"imagenet-peer-{other}").start()
        threading.Thread(target=self._beat, daemon=True, name="imagenet-heartbeat").start()
        atexit.register(self._at_exit)
        self._excepthook = sys.excepthook
        sys.excepthook = self._uncaught

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for link in list(self.links.values()):
                link.send(kind="hb")

    def _read(self, other: int, link: _Link) -> None:
        try:
            self._watch(other, link)
        finally:
            link.closed.set()

    def _watch(self, other: int, link: _Link) -> None:
        while True:
            try:
                msg = link.recv(SILENCE_S)
            except socket.timeout:
                if self._stop.is_set():
                    return
                self._peer_lost(other, f"sent nothing for {SILENCE_S:g} s (its host or the "
                                "network between us is down, or it hangs)")
                return
            if self._stop.is_set():  # leaving ourselves: read on until the peer hangs up
                if msg is None:
                    return
                continue
            if msg is None:
                self._peer_lost(other, "exited or was killed before the end of training "
                                "(its connection closed)")
                return
            kind = msg.get("kind")
            if kind == "bye":
                self.left.add(other)
                return
            if kind == "fail":
                self._peer_lost(int(msg.get("process_id", other)),
                                f"failed: {msg.get('message')}")
                return
            if kind == "peer_lost":  # process 0 relays what it saw of a third process
                self._peer_lost(int(msg["process_id"]), str(msg["why"]), relay=False)
                return

    def _peer_lost(self, who: int, why: str, relay: bool = True) -> None:
        with self._decide:
            if self._stop.is_set():
                return
            self._lost.set()
            self._stop.set()
        if relay and self.pid == 0:
            for other, link in self.links.items():
                if other != who:
                    link.send(kind="peer_lost", process_id=who, why=why)
        print(f"error: process {who} of {self.n} {why}; stopping process {self.pid} too "
              "(training needs every process; rerun all of them to resume from the last "
              "snapshot)", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def _settle(self) -> None:
        """An error in this process may be the echo of a peer's death (a collective fails as
        the dead process's connections close, at the moment its link here does): give the
        reader threads SETTLE_S to say so first. When one does, it ends the process with its
        line, so this never returns then."""
        if self._settled:
            return
        self._settled = True
        if self._lost.wait(SETTLE_S):
            threading.Event().wait()  # the reader thread is calling os._exit

    def _uncaught(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        """sys.excepthook: a peer's death first, then the traceback of this process's own."""
        self._settle()
        self._excepthook(kind, value, tb)

    def report_failure(self, message: str) -> None:
        """This process is ending in an error: tell the others (they stop at once) and leave
        without JAX's shutdown barrier. Where the error only echoes a peer's death, the line
        naming that peer wins (see _settle)."""
        if self._stop.is_set():
            return
        self._settle()
        with self._decide:
            if self._stop.is_set():
                return
            self.failed = True
            self._stop.set()
        for link in self.links.values():
            link.send(kind="fail", process_id=self.pid, message=message)
        # the others must read our line before our links close (a close with heartbeats
        # unread resets the connection, and the line may be lost); in process 0 without a
        # service helper, JAX's coordination service lives here too and their JAX clients
        # would abort natively once it is gone
        deadline = time.monotonic() + FAIL_GRACE_S
        for link in self.links.values():
            link.closed.wait(max(0.0, deadline - time.monotonic()))

    def _at_exit(self) -> None:
        last = getattr(sys, "last_value", None)  # set for an uncaught exception
        if last is not None and not self.failed:
            line = str(last).strip().splitlines()
            self.report_failure(line[0] if line else type(last).__name__)
        if self.failed:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)  # skip jax.distributed's shutdown barrier: the others are gone
        if not self._stop.is_set():
            self._stop.set()
            for link in self.links.values():
                link.send(kind="bye")
