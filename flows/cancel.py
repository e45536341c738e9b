"""One cancellation message, whichever way a run was cancelled.

A cancelled pipeline run ends with its own state message, the one line that says where it
stopped ("stage train-0-100: stopped by SIGTERM at iteration 82 after the snapshot (...); a
rerun resumes there"). But when the cancellation comes through Prefect's worker (the UI's
Cancel, `prefect flow-run cancel`, `make down`), the worker, once the flow process has exited,
writes its own Cancelled state over it: "Flow run was cancelled successfully." (prefect
runner/_cancellation_manager.py). So the flow's on_cancellation hook, which the worker runs
(in a subprocess) just before that, starts a detached `python -m flows.cancel RUN_ID` that
waits for the overwrite and puts the run's own message back (`keep_cancel_message`), and
`make down` does the same before it stops the worker: every cancelled run keeps its message.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

# What Prefect's runner and engine write when they cancel a run.
GENERIC_MESSAGES = frozenset({"Flow run was cancelled successfully.", "Flow run was cancelled.",
                              "Runner is shutting down."})
# The worker finalizes within a second of the flow process's exit; a little more under load.
KEEP_WAIT_S = 30.0
POLL_S = 0.25
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _own_message(states: list[Any]) -> str | None:
    """The message of the newest Cancelled state the run wrote itself (not a generic one)."""
    for state in reversed(states):
        if state.is_cancelled() and state.message and state.message not in GENERIC_MESSAGES:
            return state.message
    return None


def keep_cancel_message(flow_run_id: UUID | str, wait_s: float = KEEP_WAIT_S) -> bool:
    """Wait up to `wait_s` for a generic Cancelled state to follow the run's own one, and put
    the run's message back when it does; True when it did (or nothing needed doing)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    run_id = UUID(str(flow_run_id))
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            states = sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
            own = _own_message(states)
            current = states[-1] if states else None
            if current is not None and current.is_cancelled() and own is not None \
                    and current.message in GENERIC_MESSAGES:
                client.set_flow_run_state(run_id, Cancelled(message=own), force=True)
                return True
            if time.monotonic() >= deadline:
                return own is None or (current is not None and current.message == own)
            time.sleep(POLL_S)


def keep_message_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook. Prefect's worker runs it in a subprocess of its own just before it
    writes its generic Cancelled state, and waits for it: so it starts a detached process
    (`python -m flows.cancel RUN_ID`) that waits for that state and puts the run's message
    back, and returns at once."""
    subprocess.Popen([sys.executable, "-m", "flows.cancel", str(flow_run.id)],
                     cwd=str(PROJECT_ROOT), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flows.cancel FLOW_RUN_ID", file=sys.stderr)
        return 2
    return 0 if keep_cancel_message(args[0]) else 1


__all__ = ["GENERIC_MESSAGES", "keep_cancel_message", "keep_message_hook"]

if __name__ == "__main__":
    sys.exit(main())
