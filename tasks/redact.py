"""Secrets never reach a log: a logging filter that masks the credentials of every URL in a log
record (userinfo, secret-looking query values; data.download.mask_secrets), on every handler of
Prefect's loggers and the root logger: the terminal, Prefect's API log handler (the database, the
UI) and files alike.

Our own code masks URLs where it writes them; this is the net under what it does not write:
Prefect's own lines, such as "Parameter validation failed for flow 'imagenet': ... Parameters:
{...}", which quote a flow's parameters before any of our code runs. Installed when tasks/ is
imported (after Prefect configured its logging), in the terminal pipeline and in a worker's
flow-run process alike.
"""
from __future__ import annotations

import logging

from data.download import mask_secrets

# The loggers whose handlers get the filter (a filter on a handler sees every record that
# propagates to it, whichever logger it was logged on).
LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flows",
           "prefect.engine", "prefect.extra")


class MaskUrlSecrets(logging.Filter):
    """Rewrites a record whose message or traceback holds a credentialed URL; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report
            return True
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            masked = mask_secrets(text)
            if masked != text:
                record.exc_text = masked
        return True


_FILTER = MaskUrlSecrets()


def install() -> None:
    """Put the filter on every handler of LOGGERS (idempotent; new handlers need a new call)."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
