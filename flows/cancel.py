"""One cancellation message, whichever way a run was cancelled.

A cancelled pipeline run ends with its own state message, the one line that says where it
stopped ("stage train-0-100: stopped by SIGTERM at iteration 82 after the snapshot (...); a
rerun resumes there"). But when the cancellation comes through Prefect's worker (the UI's
Cancel, `prefect flow-run cancel`, `make down`), the worker, once the flow process has exited,
writes its own Cancelled state over it: "Flow run was cancelled successfully." (prefect
runner/_cancellation_manager.py). So the flow's on_cancellation hook, which the worker runs
just before that, and `make down` wait for that overwrite and put the run's own message back
(`keep_cancel_message`), leaving every cancelled run with the same kind of message.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any
from uuid import UUID

# What Prefect's runner and engine write when they cancel a run.
GENERIC_MESSAGES = frozenset({"Flow run was cancelled successfully.", "Flow run was cancelled.",
                              "Runner is shutting down."})
# The worker finalizes within a second of the flow process's exit; a little more under load.
KEEP_WAIT_S = 30.0
POLL_S = 0.25
# Set by the worker in the flow run's own process (never in the worker itself).
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"


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
    """on_cancellation hook: in the worker (which runs it just before writing its generic
    Cancelled state), watch for that state in the background and restore the run's message.
    In the flow's own process it does nothing (the message there is already the run's)."""
    if os.environ.get(FLOW_RUN_ENV):
        return

    def keep() -> None:
        try:
            keep_cancel_message(flow_run.id)
        except Exception:  # noqa: BLE001 - cosmetic: the run is cancelled either way
            pass

    threading.Thread(target=keep, name="keep-cancel-message", daemon=True).start()


__all__ = ["GENERIC_MESSAGES", "keep_cancel_message", "keep_message_hook"]
