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
  JAX's shutdown barrier, which would otherwise hold it up to 300 s.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
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
# Seconds process 0, failing, waits for the others to hang up before it exits.
FAIL_GRACE_S = 3.0


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


def _listen(port: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                        reuse_port=False)
        return socket.create_server(("", port))
    except OSError as err:
        raise ImagenetError(f"process 0 cannot listen on port {port} ({err.strerror}): "
                            "another program (or an earlier training) uses it; choose another "
                            "--coordinator port") from None


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def rendezvous(host: str, port: int, n: int, pid: int, timeout_s: float) -> dict[int, _Link]:
    """All n processes present, or ImagenetError naming who is missing; returns this process's
    links (process 0: one per other process; the others: {0: link})."""
    coord = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        return _gather(port, n, coord, deadline, timeout_s)
    link = None
    while link is None:
        try:
            sock = socket.create_connection((host.strip("[]"), port),
                                            timeout=max(0.1, deadline - time.monotonic()))
            link = _Link(sock)
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ImagenetError(
                    f"process {pid} of {n}: could not reach process 0 at --coordinator={coord} "
                    f"within {timeout_s:g} s ({getattr(err, 'strerror', None) or err}): check "
                    f"that process 0 runs with --coordinator={coord} --num_processes={n}, that "
                    f"{host} is process 0's host as seen from here and port {port} is open to "
                    "this host (--join_timeout if hosts start slowly)") from None
            time.sleep(RETRY_S)
    link.send(kind="hello", process_id=pid, num_processes=n, host=socket.gethostname())
    try:
        msg = link.recv(max(0.1, deadline - time.monotonic()) + VERDICT_GRACE_S)
    except socket.timeout:
        msg = {"kind": "abort", "message": f"process {pid} of {n}: no answer from process 0 at "
               f"{coord} within {timeout_s:g} s of reaching it"}
    if msg is None:
        raise ImagenetError(f"process {pid} of {n}: process 0 at {coord} closed the connection "
                            "during startup: see process 0's output")
    if msg.get("kind") != "go":
        link.close()
        raise ImagenetError(str(msg.get("message", msg)))
    return {0: link}


def _gather(port: int, n: int, coord: str, deadline: float, timeout_s: float
            ) -> dict[int, _Link]:
    """Process 0's side of the rendezvous."""
    server = _listen(port)
    links: dict[int, _Link] = {}
    try:
        while len(links) < n - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [i for i in range(1, n) if i not in links]
                message = (f"process{'es' if len(missing) > 1 else ''} {_ids(missing)} of {n} "
                           f"did not join within "
                           f"{timeout_s:g} s (coordinator {coord}; joined: "
                           f"{_ids([0, *sorted(links)])}): check that "
                           f"{'each was' if len(missing) > 1 else 'it was'} started with "
                           f"--coordinator={coord} --num_processes={n} --process_id=<id>, and "
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
        for link in links.values():
            link.send(kind="go")
        return links
    except BaseException:
        for link in links.values():
            link.close()
        raise
    finally:
        server.close()  # JAX's coordination service binds this port next


class Watchdog:
    """Heartbeats on the rendezvous links; stops this process, with one line, when a peer
    fails or goes away before saying bye."""

    def __init__(self, links: dict[int, _Link], pid: int, n: int) -> None:
        self.links, self.pid, self.n = links, pid, n
        self.left: set[int] = set()
        self.failed = False
        self._stop = threading.Event()
        for other, link in links.items():
            threading.Thread(target=self._read, args=(other, link), daemon=True,
                             name=f"imagenet-peer-{other}").start()
        threading.Thread(target=self._beat, daemon=True, name="imagenet-heartbeat").start()
        atexit.register(self._at_exit)

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
        if self._stop.is_set():
            return
        self._stop.set()
        if relay and self.pid == 0:
            for other, link in self.links.items():
                if other != who:
                    link.send(kind="peer_lost", process_id=who, why=why)
        print(f"error: process {who} of {self.n} {why}; stopping process {self.pid} too "
              "(training needs every process; rerun all of them to resume from the last "
              "snapshot)", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def report_failure(self, message: str) -> None:
        """This process is ending in an error: tell the others (they stop at once) and leave
        without JAX's shutdown barrier."""
        if self._stop.is_set():
            return
        self.failed = True
        self._stop.set()
        for link in self.links.values():
            link.send(kind="fail", process_id=self.pid, message=message)
        if self.pid == 0:
            # JAX's coordination service lives in process 0: the others must act on our line
            # before it goes, or their JAX client aborts natively first
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
