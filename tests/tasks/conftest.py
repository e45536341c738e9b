"""tasks/ tests: Prefect gets a throw-away PREFECT_HOME (and so result storage) before anything
imports it, and never talks to a server a developer may have running (PREFECT_API_URL unset)."""
from __future__ import annotations

import os
import tempfile

if "IMAGENET_TEST_PREFECT_HOME" not in os.environ:
    os.environ["IMAGENET_TEST_PREFECT_HOME"] = tempfile.mkdtemp(prefix="imagenet-prefect-home-")
os.environ["PREFECT_HOME"] = os.environ["IMAGENET_TEST_PREFECT_HOME"]
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
