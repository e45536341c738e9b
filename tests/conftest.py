"""Shared fixtures: where the real-Caffe goldens live, and skipping loudly where they don't.

Prefect, for every test that imports it (tasks/, flows/): a throw-away PREFECT_HOME (so its
database and result storage) set here, before anything imports prefect; never a server a
developer may have running (PREFECT_API_URL unset). PREFECT_NOTES: the test harness's first
start on a fresh database needs more than Prefect's default 20 s.

The goldens sit in ../shared/caffe-golden beside the clone (read-only in CI: open LMDBs there
with readonly=True, lock=False, or copy them first). A user's clone has no ../shared; every
test that needs it is skipped and the session header says why, once.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

if "IMAGENET_TEST_PREFECT_HOME" not in os.environ:
    os.environ["IMAGENET_TEST_PREFECT_HOME"] = tempfile.mkdtemp(prefix="imagenet-prefect-home-")
os.environ["PREFECT_HOME"] = os.environ["IMAGENET_TEST_PREFECT_HOME"]
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
# Convolution plans: the built-in rule, never a developer's measured cache nor a measurement
# (model/autotune.py); the tests that exercise measuring set their own mode and cache dir.
os.environ["IMAGENET_CONV_PLANS"] = "heuristic"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(os.environ.get("IMAGENET_GOLDEN_DIR", REPO.parent / "shared" / "caffe-golden"))
GOLDEN_MISSING = (
    f"SKIPPING real-Caffe golden comparisons: {GOLDEN_DIR} does not exist "
    "(it ships beside the developers' and CI's clone as ../shared/caffe-golden)"
)


def pytest_report_header(config):
    if not GOLDEN_DIR.is_dir():
        return [GOLDEN_MISSING]
    return [f"caffe goldens: {GOLDEN_DIR}"]


def pytest_collection_modifyitems(config, items):
    if GOLDEN_DIR.is_dir():
        return
    skip = pytest.mark.skip(reason=GOLDEN_MISSING)
    for item in items:
        if "golden" in getattr(item, "fixturenames", ()) or item.get_closest_marker("golden"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden() -> Path:
    """Path of ../shared/caffe-golden (tests using it are skipped where it is absent)."""
    return GOLDEN_DIR
