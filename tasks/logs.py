"""Tracebacks go to the DEBUG log, never to ERROR.

A stage that fails says so in one line (its state message, an ERROR log line); the traceback
is for whoever debugs it, at DEBUG. Our own code logs that way (tasks.stage.fail_in_one_line).
Prefect's engines log some failures with the traceback attached at ERROR (a task whose retries
are exhausted: "Task run failed with exception: ... - Retries are exhausted", a flow that
raised), which puts 30 lines of engine frames in the UI's log and the terminal. The filter
here, on Prefect's run and engine loggers, splits such a record in two: the traceback as a
DEBUG record first ("traceback of the next error"), then the ERROR line without it.
`install()` is idempotent; the flows call it when they are imported, so it holds in every
process that runs them (a worker's flow subprocess, `imagenet pipeline`, the tests).
"""
from __future__ import annotations

import copy
import logging

# Where Prefect logs task and flow failures (prefect.logging.loggers: task_run_logger,
# flow_run_logger, and the engines' module loggers).
PREFECT_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine",
                   "prefect.flow_engine", "prefect.engine")
TRACEBACK_NOTE = "traceback of the next error: "


class TracebackToDebug(logging.Filter):
    """An ERROR/WARNING record with a traceback becomes a DEBUG record with the traceback,
    followed by the record itself without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.levelno < logging.WARNING:
            return True
        if record.exc_info[0] is None:  # exc_info=True outside an `except`: "NoneType: None"
            record.exc_info = None
            return True
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(logging.DEBUG):  # Logger.handle skips the level check
            detail = copy.copy(record)
            detail.levelno, detail.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            detail.msg, detail.args = TRACEBACK_NOTE + record.getMessage(), ()
            logger.handle(detail)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_FILTER = TracebackToDebug()


def install() -> None:
    """Put the filter on Prefect's run and engine loggers (once)."""
    for name in PREFECT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


__all__ = ["TracebackToDebug", "install"]
