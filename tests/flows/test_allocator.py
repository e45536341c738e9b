"""flows/allocator.py: when the training commands restart under jemalloc, and with what."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import ImagenetError
from flows import allocator, cli

LIB = "/opt/lib/libjemalloc.so.2"


def test_auto_preloads_jemalloc_keeping_other_preloads() -> None:
    env = allocator.jemalloc_environment("auto", {"LD_PRELOAD": "/x/libother.so", "A": "1"}, LIB)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libother.so" and env["A"] == "1"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert env[allocator.ACTIVE_ENV] == "jemalloc"


def test_no_reexec_when_done_refused_or_missing() -> None:
    assert allocator.jemalloc_environment("auto", {allocator.ACTIVE_ENV: "jemalloc"}, LIB) is None
    assert allocator.jemalloc_environment("system", {}, LIB) is None
    assert allocator.jemalloc_environment("auto", {}, None) is None  # not installed: carry on
    with pytest.raises(ImagenetError, match="apt-get install libjemalloc2"):
        allocator.jemalloc_environment("jemalloc", {}, None)
    with pytest.raises(ImagenetError, match="valid: auto, jemalloc, system"):
        allocator.jemalloc_environment("tcmalloc", {}, LIB)


def test_console_entry_restarts_training_commands_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(allocator, "reexec_with_allocator",
                        lambda choice, argv: calls.append((choice, argv)))
    monkeypatch.delenv(allocator.CHOICE_ENV, raising=False)
    for argv in (["time", "--help"], ["compute-image-mean", "--help"]):
        monkeypatch.setattr(sys, "argv", ["imagenet", *argv])
        with pytest.raises(SystemExit) as done:
            cli.entry()
        assert done.value.code == 0
    # Only `time` asked; it restarts as `python -m flows.cli time --help`.
    assert calls == [("auto", ["-m", "flows.cli", "time", "--help"])]
    assert cli.ALLOCATOR_COMMANDS == {"train", "test", "time"}


def test_reexec_replaces_the_process_with_jemalloc_preloaded() -> None:
    library = allocator.find_jemalloc()
    if library is None:
        pytest.skip("libjemalloc2 is not installed here: nothing to restart with")
    probe = "import os; print(os.environ['IMAGENET_ALLOCATOR_ACTIVE'], os.environ['LD_PRELOAD'])"
    code = f"from flows import allocator; allocator.reexec_with_allocator('auto', ['-c', {probe!r}])"
    env = {k: v for k, v in os.environ.items() if k != allocator.ACTIVE_ENV}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jemalloc", library]
