"""`imagenet pipeline`: every flow parameter is a flag (Caffe's spellings too), lists are
comma-separated, and bad values fail before any run."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.commands import pipeline
from flows.flags import caffe_style_argv


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    return parser.parse_args(caffe_style_argv(argv))


def test_flags_build_the_flow_parameters(tmp_path):
    base = tmp_path / "params.json"
    base.write_text(json.dumps({"data_root": "/from/json", "sources": {"aux": "/aux.tgz"}}))
    p = pipeline.build_params(_parse([
        "--params", str(base), "-resize_height=64", "--resize-width", "64", "--stages=convert,mean",
        "--force", "convert", "--train", "http://m/ILSVRC2012_img_train.tar", "--shuffle_seed=none",
        "--encoded=true", "--max_iter", "300", "--devices", "0,1"]))
    assert p.data_root == "/from/json"
    assert (p.resize_height, p.resize_width, p.encoded, p.shuffle_seed) == (64, 64, True, None)
    assert p.stages == ["convert", "mean"] and p.force == ["convert"]
    assert p.sources.train == "http://m/ILSVRC2012_img_train.tar" and p.sources.aux == "/aux.tgz"
    assert p.max_iter == 300 and p.devices == [0, 1]


def test_bad_values_fail_before_a_run():
    with pytest.raises(Exception, match="stages"):
        pipeline.build_params(_parse(["--stages=convert,nonsense"]))
    with pytest.raises(Exception, match="resize_height"):
        pipeline.build_params(_parse(["--resize_height=-3"]))


def test_prefect_state_goes_to_the_data_root_not_the_checkout(tmp_path, monkeypatch):
    """PREFECT_HOME is chosen from --data_root (or --params' data_root, or the default data
    root) before Prefect is imported; a PREFECT_HOME in the environment wins."""
    from flows import prefect_env
    from flows.imagenet import PipelineParams

    assert PipelineParams().data_root == pipeline.DEFAULT_DATA_ROOT
    for name in ("PREFECT_HOME", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = pipeline.prepare(["--data_root", str(tmp_path / "root"), "--stages=convert"])
    assert home == tmp_path / "root" / ".prefect"
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(home / "jax-cache")
    assert prefect_env.PROJECT_ROOT not in home.parents

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"data_root": str(tmp_path / "json-root")}))
    monkeypatch.delenv("PREFECT_HOME")
    assert pipeline.prepare(["--params", str(params)]) == tmp_path / "json-root" / ".prefect"
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.chdir(tmp_path)
    assert pipeline.prepare([]) == tmp_path / pipeline.DEFAULT_DATA_ROOT / ".prefect"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    assert pipeline.prepare(["--data_root", "/elsewhere"]) == tmp_path / "mine"

    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    assert "DATA_ROOT/.prefect" in parser.format_help()


# ---------------------------------------------------------------- the terminal pipeline's Prefect

def _pipeline(tiny_mirror, tiny_solver, root, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "pipeline",
            f"--train={tiny_mirror / 'ILSVRC2012_img_train.tar'}",
            f"--val={tiny_mirror / 'ILSVRC2012_img_val.tar'}",
            f"--aux={tiny_mirror / 'caffe_ilsvrc12.tar.gz'}",
            f"--checksums={tiny_mirror / 'MD5SUMS'}", f"--data_root={root}",
            f"--solver={tiny_solver}", "--resize_height=16", "--resize_width=16", "--workers=1",
            *extra]


def _user_env() -> dict[str, str]:
    """The environment of a user's terminal: no PREFECT_API_URL (a temporary server) and no
    PREFECT_HOME (it goes to the data root)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", "IMAGENET_DEBUG")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def _signal_during_training(command: list[str], cwd: Path, sig: int) -> tuple[int, str, float]:
    """Start the command in a session of its own (a terminal's process group), send `sig` to
    the whole group once training iterates, as a terminal's Ctrl-C does; (exit status, output,
    seconds from the signal to the exit). Every process of the group must be gone after."""
    log = cwd / f"pipeline-{sig}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=_user_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"\] Iteration [1-9]", log.read_text()):  # a snapshot to resume
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        sent = time.monotonic()
        os.killpg(proc.pid, sig)
        status = proc.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = ""
    for _ in range(20):  # no temporary server (nor anything else) left behind
        left = subprocess.run(["ps", "-o", "pid,stat,args", "--no-headers", "-g", str(proc.pid)],
                              capture_output=True, text=True).stdout.strip()
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
    return status, log.read_text(), seconds


@pytest.mark.slow
def test_pipeline_stops_within_seconds_on_sigterm_and_ctrl_c(tiny_mirror, tiny_solver, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the temporary Prefect server too;
    after the snapshot the run hung for 220-300 s on refused connections and exited 70. Now the
    server is deaf to SIGINT and restarted if a group SIGTERM ends it: 143 and 130 within
    seconds, the snapshot named, and the rerun resumes from it."""
    command = _pipeline(tiny_mirror, tiny_solver, tmp_path / "root", "--max_iter=1000000",
                        "--snapshot_interval=1000000")
    status, text, seconds = _signal_during_training(command, tmp_path, signal.SIGTERM)
    assert status == 143, text[-3000:]
    assert seconds < 60 and "ConnectError" not in text, (seconds, text[-3000:])
    assert "stopped by SIGTERM" in text and "after the snapshot" in text
    status, text, seconds = _signal_during_training(command, tmp_path, signal.SIGINT)
    assert status == 130 and seconds < 60 and "ConnectError" not in text, text[-3000:]
    assert "Resuming from" in text and "stopped by SIGINT" in text


def test_a_temporary_server_that_does_not_start_is_one_error(monkeypatch, tmp_path):
    """Prefect's RuntimeError ("Timed out while attempting to connect to ephemeral Prefect API
    server ... stdout: ... stderr: <its traceback>") was a bug exit; now an ImagenetError that
    keeps the reason and drops the server's output (printed above it already)."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from data.errors import ImagenetError
    from flows.commands import pipeline

    def refuse(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API "
                           "server. Ephemeral server process exited with code 3. stdout: x "
                           "stderr: Traceback (most recent call last): ...")

    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "start", refuse)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ImagenetError) as caught:
            pipeline.start_temporary_server()
    message = str(caught.value)
    assert ("Prefect's temporary server did not start (Timed out while attempting to connect "
            "to ephemeral Prefect API server. Ephemeral server process exited with code 3.)"
            in message), message
    assert "Traceback" not in message and "make up" in message
