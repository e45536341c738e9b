"""tasks/redact.py: every handler of Prefect's loggers masks credentialed URLs in what it writes
(the terminal, the API log handler behind the database and the UI), Prefect's own lines too."""
from __future__ import annotations

import io
import logging
import sys

import tasks.acquire  # noqa: F401 - installs the filter, as the flow's import does
from tasks import redact


def test_prefect_handlers_mask_url_credentials():
    # Prefect's (pytest adds its own capture handlers to the root logger after the import).
    handlers = [h for name in redact.LOGGERS for h in logging.getLogger(name).handlers
                if type(h).__name__ in ("PrefectConsoleHandler", "APILogHandler")]
    assert {type(h).__name__ for h in handlers} == {"PrefectConsoleHandler", "APILogHandler"}
    assert all(redact._FILTER in h.filters for h in handlers)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redact._FILTER)
    log = logging.getLogger("prefect.flows.redact-test")
    log.addHandler(handler)
    try:
        log.error("Parameters: %s", {"sources": "http://u:Red4ctPw@h/x.tar?sig=Red4ctSig"})
        try:
            raise ValueError("cannot fetch https://h/y.tar?X-Amz-Signature=Red4ctTb")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "http://***@h/x.tar?sig=***" in text and "X-Amz-Signature=***" in text
    assert "Red4ct" not in text
    assert sys.exc_info() == (None, None, None)
