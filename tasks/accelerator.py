"""One training per host: the slot a flow run holds on this host's accelerator(s).

`make up` creates a Prefect global concurrency limit named ACCELERATOR_LIMIT (this host's name
in it) with one slot (flows/services.py). A flow run takes the slot before its first training
segment or evaluation and keeps it until the flow run ends: the process that trained keeps its
JAX client, and on a GPU the memory XLA allocated, until it exits, so holding the slot per task
would let a second run onto a device the first one still fills. A run that finds the slot taken
says so (log line and an `imagenet.pipeline.waiting` event, which `prefect deployment run
--watch` prints) and waits; cancelled meanwhile, it ends Cancelled at once. Workers on other
hosts have limits of their own, so hosts sharing a server train in parallel; where no such
limit exists (`imagenet pipeline`'s own server, a server `make up` did not set up) nothing is
held.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from tasks import report
from tasks.stage import StageCancelled

ACCELERATOR_LIMIT = f"imagenet-accelerator:{socket.gethostname()}"
ACCELERATOR_SLOTS = 1
WAITING_EVENT = "imagenet.pipeline.waiting"
# The lease on the slot, renewed while held: a run killed with SIGKILL frees it after this.
LEASE_S = 60
# A waiting run asks again this often. Each ask is one non-blocking request: Prefect's own
# blocking acquisition goes on in a background thread after a SIGTERM (a cancelled waiting
# run), delays the process's exit until it gets the slot, and then holds it until the lease
# expires (seen: a cancelled waiting run kept the slot from the next run).
WAIT_POLL_S = 5
LOCKED = 423  # the server's answer when every slot is taken
STOP_CHECK_S = 0.2  # how soon a SIGTERM ends the wait


@contextmanager
def accelerator_slot(log: Any, stage: str) -> Iterator[bool]:
    """Hold this host's accelerator slot for the body; yields whether a limit exists (False:
    nothing to hold). SIGTERM (a cancelled run) or SIGINT while waiting: StageCancelled for
    `stage`, so the run ends Cancelled at once, saying so."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from model.stop import StopRequest

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT)
        except ObjectNotFound:
            limit = None
    if limit is None or not limit.active:
        log.debug("no concurrency limit %s: training without holding this host's accelerator",
                  ACCELERATOR_LIMIT)
        yield False
        return
    stop: list[str] = []
    with ExitStack() as held:
        with StopRequest(stop.append):
            waiting = False
            while True:
                try:
                    held.enter_context(concurrency(ACCELERATOR_LIMIT, occupy=1,
                                                   lease_duration=LEASE_S, max_retries=0))
                    break
                except ConcurrencySlotAcquisitionError as err:
                    cause = err.__cause__
                    if not (isinstance(cause, httpx.HTTPStatusError)
                            and cause.response.status_code == LOCKED):
                        raise
                if not waiting:
                    waiting = True
                    line = (f"waiting for this host's accelerator: another run is training or "
                            f"evaluating on it (concurrency limit {ACCELERATOR_LIMIT})")
                    log.info("%s", line)
                    report.announce(line, {"limit": ACCELERATOR_LIMIT}, event=WAITING_EVENT)
                deadline = time.monotonic() + WAIT_POLL_S
                while not stop and time.monotonic() < deadline:
                    time.sleep(STOP_CHECK_S)
                if stop:
                    raise StageCancelled(stage, f"stopped by {stop[0]} while waiting for this "
                                         f"host's accelerator (concurrency limit "
                                         f"{ACCELERATOR_LIMIT}); nothing was trained")
        log.info("holding this host's accelerator (concurrency limit %s) until the run ends",
                 ACCELERATOR_LIMIT)
        yield True
