"""The host as the data stages see it: the cores this process may use, and worker processes
that end with the process that started them.

A module of its own so that light commands (compute-image-mean) get it without importing the
conversion machinery (data/convert.py: multiprocessing, image decoding, downloads).
"""
from __future__ import annotations

import os
import select
import threading
import time


def available_cores() -> int:
    """Cores this process may run on (taskset, cgroups' cpusets), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def exit_with(owner: int) -> None:
    """Make this worker process exit as soon as process `owner` (the one that started its pool)
    ends, however it ends: SIGKILL included.

    A forkserver pool's workers are children of the forkserver, not of the pool's owner, so
    PR_SET_PDEATHSIG and getppid() watch the wrong process; and every worker holds the pipe end
    whose closing tells the forkserver that its owner is gone, so the forkserver never learns
    it either. After a SIGKILL of the owner the forkserver, its resource tracker and the idle
    workers stayed forever (found by benchmarks/faults.py's deploy campaign: a flow-run
    process killed while extracting). Once the workers exit, the forkserver and the tracker
    see their pipes close and exit too. Call it from the pool's initializer with the owner's
    os.getpid() taken when the pool was made.
    """
    try:
        handle: int | None = os.pidfd_open(owner)  # Linux 5.3+: readable once owner exits
    except ProcessLookupError:
        os._exit(1)  # the owner is already gone
    except (AttributeError, OSError):
        handle = None  # another OS or an older kernel: poll

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(owner, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass  # alive, another user's (a reused pid): keep polling
        os._exit(1)  # nothing of this worker's is wanted any more: no cleanup, no traceback

    threading.Thread(target=watch, name=f"exit-with-{owner}", daemon=True).start()


__all__ = ["available_cores", "exit_with"]
