"""Prefect settings every entry point of this project applies BEFORE importing prefect.

PREFECT_NOTES (../shared/docs) measured why: `import prefect` creates ~/.prefect unless
PREFECT_HOME is set; a first ephemeral run on a fresh database times out at the default 20 s;
telemetry makes a DNS lookup and a "database is locked" traceback unless switched off. Values
already in the environment win (a user's PREFECT_API_URL pointing at `make up`'s server, say).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Project-local Prefect home (git-ignored): database, profiles, logs of ephemeral runs of the
# demo, `make up` and the tests.
PREFECT_HOME = PROJECT_ROOT / ".prefect"
# `imagenet pipeline` keeps its Prefect state (database, logs, the JAX compilation cache) in
# this folder of its data root: with the data it belongs to, wherever the command is run from
# and never in the checkout (pipeline_home).
PIPELINE_HOME_DIRNAME = ".prefect"
JAX_CACHE_DIRNAME = "jax-cache"
# Creating the SQLite database of a fresh PREFECT_HOME took longer than Prefect's 20 s default.
EPHEMERAL_STARTUP_TIMEOUT_S = "180"

DEFAULTS: dict[str, str] = {
    "PREFECT_HOME": str(PREFECT_HOME),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": EPHEMERAL_STARTUP_TIMEOUT_S,
    # No telemetry leaves the machine.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "INFO",
}


def pipeline_home(data_root: str | os.PathLike) -> Path:
    """The PREFECT_HOME of `imagenet pipeline` runs on `data_root`."""
    return Path(data_root).expanduser().resolve() / PIPELINE_HOME_DIRNAME


def configure(**overrides: str) -> None:
    """Set this project's Prefect defaults where the environment does not already say."""
    for name, value in {**DEFAULTS, **overrides}.items():
        os.environ.setdefault(name, value)
    # Training runs one task per snapshot interval, each a new train() call whose step XLA
    # would compile again (~5-60 s on 2 busy cores); the persistent cache compiles it once.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          str(Path(os.environ["PREFECT_HOME"]) / JAX_CACHE_DIRNAME))
    # Analytics must be off whatever a profile says.
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
