"""Fixtures for the ILSVRC12 acquisition tests: a tiny mini-ILSVRC12 (built once per session)
and a real HTTP mirror of it on 127.0.0.1 with injectable faults (see http_fixture.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from data.mini import SIZES, MiniResult, make_mini_ilsvrc12

# Loaded by path: tests run with --import-mode=importlib and are not a package.
_spec = importlib.util.spec_from_file_location(
    "ilsvrc12_http_fixture", Path(__file__).with_name("http_fixture.py"))
http_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_fixture)
MirrorServer = http_fixture.MirrorServer


@pytest.fixture(scope="session")
def mini_tiny(tmp_path_factory) -> MiniResult:
    """The `tiny` mini-ILSVRC12 (3 classes x 4 train + 2 val each), read-only for tests."""
    classes, train, val = SIZES["tiny"]
    return make_mini_ilsvrc12(tmp_path_factory.mktemp("mini_tiny"), classes=classes,
                              train_per_class=train, val_per_class=val, seed=0)


@pytest.fixture
def mirror(mini_tiny):
    """An HTTP server serving the tiny mini mirror's files; stopped after the test."""
    with MirrorServer(mini_tiny.outdir) as server:
        yield server
