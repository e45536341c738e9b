"""No credential given in a source URL (user:password@, a signed query) ever shows: not on the
terminal, in Prefect's database and logs, in the stage cache, the manifests or any file under
the data root; and the credentials still reach the mirror. The places a URL can surface: log
lines, error messages and state messages, manifests and stage records, flow-run parameters,
task-run names and progress cards (named by archive only), cache keys and records."""
from __future__ import annotations

import base64
import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import ilsvrc12

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "secrets_http_fixture", REPO / "tests" / "data" / "http_fixture.py")
http_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_fixture)
TRAIN, VAL, AUX = ilsvrc12.TRAIN_ARCHIVE, ilsvrc12.VAL_ARCHIVE, ilsvrc12.AUX_ARCHIVE
# Seconds to wait for Prefect's background log worker to write a run's lines to its database.
LOG_WAIT_S = 60


@pytest.fixture
def mirror(tiny_mirror):
    """The tiny mirror, recording each request's headers and target (query included)."""
    with http_fixture.MirrorServer(tiny_mirror, max_lifetime=600) as server:
        yield server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_user(url: str, userinfo: str) -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


def _basic(user: str, password: str) -> bytes:
    return base64.b64encode(f"{user}:{password}".encode())


def _leaks(root: Path, secrets: list[bytes]) -> list[str]:
    """'file: secret' for every file under `root` holding one of `secrets`."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {s!r}" for s in secrets if s in data]
    return found


def _pipeline(argv: list[str]) -> subprocess.CompletedProcess:
    """`imagenet pipeline ...` as a user runs it: Prefect's home in the data root."""

    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_HOME", "PREFECT_API_URL", "IMAGENET_USERNAME",
                        "IMAGENET_PASSWORD", "IMAGENET_TOKEN")}
    return subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=540)


def _harness_db() -> list[Path]:
    """The test server's SQLite files (database and write-ahead log)."""
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    db = Path(url.split(":///", 1)[1])
    return [p for p in (db, db.with_name(db.name + "-wal")) if p.is_file()]


def test_terminal_pipeline_keeps_url_credentials_out_of_everything(mirror, tmp_path):
    """`imagenet pipeline` with user:pass@, a signed URL and a credentialed checksum list: the
    mirror gets every credential, nothing the run stores shows one (its terminal output: the
    next test, in a process of its own)."""
    from prefect.logging.handlers import APILogHandler

    from flows.cli import main as cli

    root = tmp_path / "root"
    secrets = {"user": "Us3rSecret", "pw": "PwS3cret", "sig": "S1gSecret", "sums": "Sum5Secret"}
    train = _with_user(mirror.url(TRAIN), f"{secrets['user']}:{secrets['pw']}")
    val = mirror.url(VAL) + f"?X-Amz-Signature={secrets['sig']}&v=1"
    sums = _with_user(mirror.url("MD5SUMS"), f"carol:{secrets['sums']}")
    code = cli(["pipeline", f"--data_root={root}", f"--train={train}", f"--val={val}",
                f"--aux={mirror.url(AUX)}", f"--checksums={sums}", "--stages=download"])
    assert code == 0
    assert mirror.requests_for(TRAIN)[0]["authorization"] == \
        "Basic " + _basic(secrets["user"], secrets["pw"]).decode()
    assert mirror.requests_for(VAL)[0][http_fixture.TARGET].endswith(
        f"?X-Amz-Signature={secrets['sig']}&v=1")
    assert "authorization" not in mirror.requests_for(VAL)[0]
    assert mirror.requests_for("MD5SUMS")[0]["authorization"] == \
        "Basic " + _basic("carol", secrets["sums"]).decode()
    forms = [s.encode() for s in secrets.values()] + [
        _basic(secrets["user"], secrets["pw"]), _basic("carol", secrets["sums"])]
    assert _leaks(root, forms) == []  # manifests, stage cache records, .part sidecars
    db = _harness_db()
    # Prefect's API log handler writes from a background worker: wait until the download's
    # (masked) line is in the database, so that the scan below sees every line the run logged
    # (under load the worker was seen to lag the flow's end).
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        APILogHandler().flush()
        with sqlite3.connect(db[0]) as conn:
            logged = [row[0] for row in conn.execute(
                "SELECT message FROM log WHERE message LIKE ?",
                (f"downloading http://***@127.0.0.1:{mirror.port}/{TRAIN} -> %",))]
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert logged, "the download's log line is not in Prefect's database"
    assert db and not [f"{f}: {s!r}" for f in db for s in forms if s in f.read_bytes()]
    # What is stored instead: the masked URLs (so the scans looked where they would be).
    manifest = (root / "downloads" / (TRAIN + ".manifest.json")).read_text()
    assert f"http://***@127.0.0.1:{mirror.port}/{TRAIN}" in manifest


def test_before_stop_hook_case_in_a_fresh_terminal(tmp_path):
    """The user's path, in its own process with Prefect's home in the data root: a
    credentialed URL to a port where nothing listens fails at once in one masked line that says
    how to give the archive; the terminal and every file under the data root (Prefect's database
    and logs included) are free of the password."""
    root = tmp_path / "root"
    hook = f"http://hookuser:Hook5ecret@127.0.0.1:{_closed_port()}/{TRAIN}?sig=HookS1g"
    failed = _pipeline([f"--data_root={root}", f"--train={hook}", f"--val={root}/none.tar",
                        "--stages=download"])
    assert failed.returncode == 1
    error = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, failed.stderr[-3000:]
    assert "sources" in error[0] and "imagenet-mirror-credentials" in error[0]
    assert "Hook5ecret" not in failed.stdout + failed.stderr
    assert "HookS1g" not in failed.stdout + failed.stderr
    assert (root / ".prefect" / "prefect.db").is_file()
    assert _leaks(root, [b"Hook5ecret", b"HookS1g", _basic("hookuser", "Hook5ecret")]) == []
    with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
        stored = " ".join(row[0] for row in db.execute("SELECT parameters FROM flow_run"))
    assert f"http://***@127.0.0.1:" in stored and "sig=***" in stored


def test_deployment_parameters_with_credentials_are_refused_and_masked(make_params, mirror,
                                                                       tmp_path):
    """A flow run whose parameters hold a credential (as `prefect deployment run --param` or
    the UI would store them) fails at once in one line naming the Secret block and the
    environment, downloads nothing, and its stored parameters are replaced by masked ones."""
    from prefect.client.orchestration import get_client

    from flows.imagenet import Sources, imagenet

    params = make_params(tmp_path / "root", stages=["download"], sources=Sources(
        train=_with_user(mirror.url(TRAIN), "u:Refus3dSecret"), val=mirror.url(VAL),
        aux=mirror.url(AUX))).flow_parameters()
    state = imagenet(**params, return_state=True)
    assert state.is_failed() and "\n" not in state.message
    assert state.message.startswith("parameters: sources.train holds a credential")
    assert "imagenet-mirror-credentials" in state.message and "IMAGENET_TOKEN" in state.message
    assert "Refus3dSecret" not in state.message
    assert mirror.requests == [] and not (tmp_path / "root").exists()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["sources"]["train"] == f"http://***@127.0.0.1:{mirror.port}/{TRAIN}"
    assert "Refus3dSecret" not in str(run.parameters)


def test_credentials_from_the_secret_block(make_params, mirror, tmp_path, monkeypatch):
    """The Secret block imagenet-mirror-credentials: username/password (or token) for the
    mirror, and signed URLs that the parameters name without their secret part."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.imagenet import Sources, imagenet
    from tasks.acquire import SECRET_BLOCK

    for name in ("IMAGENET_USERNAME", "IMAGENET_PASSWORD", "IMAGENET_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    signed = mirror.url(VAL) + "?sig=Bl0ckSig"
    Secret(value={"username": "sb", "password": "Bl0ckSecret", "urls": [signed]}).save(
        SECRET_BLOCK, overwrite=True)
    try:
        params = make_params(tmp_path / "root", stages=["download"], sources=Sources(
            train=mirror.url(TRAIN), val=mirror.url(VAL), aux=mirror.url(AUX),
            checksums=mirror.url("MD5SUMS"))).flow_parameters()
        state = imagenet(**params, return_state=True)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_block_document(Secret.load(SECRET_BLOCK)._block_document_id)
    assert state.is_completed(), state.message
    basic = "Basic " + _basic("sb", "Bl0ckSecret").decode()
    assert mirror.requests_for(TRAIN)[0]["authorization"] == basic
    assert mirror.requests_for(VAL)[0][http_fixture.TARGET].endswith("?sig=Bl0ckSig")
    assert _leaks(tmp_path / "root", [b"Bl0ckSecret", b"Bl0ckSig", basic.encode()]) == []
