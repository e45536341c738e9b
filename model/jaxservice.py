"""JAX's coordination service in a process of its own, beside process 0 (model/peers.py's
ServiceHelper runs this file by its path, so it imports jaxlib alone, not the project).

usage: python jaxservice.py BIND_ADDRESS NUM_PROCESSES HEARTBEAT_S SHUTDOWN_S GRACE_S

It imports jaxlib and says "imported" on stdout (or "unsupported ..." where this jaxlib has no
get_distributed_runtime_service), waits for the line "serve" on stdin, starts the service as
jax.distributed.initialize would in process 0 and says "ready" (or "error <why>"), then waits
for EOF on stdin (or for its parent to change), which comes when process 0 has ended, however
it ended, and lingers GRACE_S
more so that the other processes leave first (their JAX clients abort natively when the
service goes away under them). Signals belong to process 0: SIGINT, SIGTERM and SIGHUP are
ignored here, so a terminal's Ctrl-C cannot take the service from under the others.
"""
import os
import select
import signal
import sys
import time

# Seconds between checks that process 0 is still this process's parent.
POLL_S = 1.0


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    bind, n, heartbeat, shutdown, grace = argv
    try:
        from jaxlib import _jax
        start = _jax.get_distributed_runtime_service
    except Exception as err:  # a jaxlib whose private API moved: process 0 hosts it after all
        print("unsupported", type(err).__name__, err, flush=True)
        return
    print("imported", flush=True)
    if sys.stdin.readline().strip() != "serve":
        return  # the rendezvous failed
    try:
        _service = start(bind, int(n), heartbeat_timeout=int(heartbeat),
                         shutdown_timeout=int(shutdown))
    except Exception as err:
        lines = str(err).strip().splitlines()
        print("error", lines[0] if lines else type(err).__name__, flush=True)
        os._exit(1)
    print("ready", flush=True)
    sys.stdout.close()
    parent = os.getppid()
    while os.getppid() == parent:  # (a child that inherited the pipe could hold EOF back)
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready and not os.read(0, 65536):
            break
    time.sleep(float(grace))
    os._exit(0)  # no teardown: the service's shutdown would wait for clients already gone


if __name__ == "__main__":
    main(sys.argv[1:])
