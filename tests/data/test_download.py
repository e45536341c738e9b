"""data/download.py against a real HTTP server on 127.0.0.1 (tests/data/http_fixture.py)."""
from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from data import ilsvrc12
from data.download import (SECRET_BLOCK, Backoff, Credentials, DownloadError, carries_credentials,
                           download, fetch_bytes, hide_url, mask_secrets, mask_url, md5_of,
                           reveal_url, source_key)
from data.errors import ImagenetError

FAST = Backoff(initial=0.001, factor=2.0, maximum=0.01, jitter=0.0)
VAL = ilsvrc12.VAL_ARCHIVE
TARGET = ":target"  # http_fixture.TARGET


@pytest.fixture
def sums(mini_tiny) -> dict[str, str]:
    return ilsvrc12.parse_md5sums(mini_tiny.md5sums.read_text(), "MD5SUMS")


def test_download_verifies_and_renames(mirror, mini_tiny, sums, tmp_path):
    seen = []
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], backoff=FAST,
                      progress=lambda done, total: seen.append((done, total)))
    assert result.path == tmp_path / VAL
    assert result.path.read_bytes() == mini_tiny.val_tar.read_bytes()
    assert result.md5 == sums[VAL] and result.md5_verified
    assert not result.resumed and not result.reused_in_place and result.attempts == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [VAL]  # no .part / .json left over
    assert seen[-1] == (result.bytes, result.bytes)


def test_drop_half_way_then_rerun_resumes_with_range(mirror, mini_tiny, sums, tmp_path):
    size = mini_tiny.val_tar.stat().st_size
    mirror.fail(VAL, ("drop", size // 2))
    with pytest.raises(ImagenetError, match="rerun to resume"):
        download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=0, backoff=FAST)
    part = tmp_path / (VAL + ".part")
    assert part.stat().st_size == size // 2
    assert not (tmp_path / VAL).exists()  # nothing that looks finished

    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=0, backoff=FAST)
    second = mirror.requests_for(VAL)[1]
    assert second["range"] == f"bytes={size // 2}-"
    assert "if-range" in second  # resumes only if the file did not change meanwhile
    assert result.resumed and md5_of(result.path) == sums[VAL]
    assert not part.exists()


def test_drop_is_retried_within_one_call(mirror, sums, tmp_path):
    mirror.fail(VAL, ("drop", 1000), ("drop", 5000))
    waits: list[float] = []
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=3, backoff=FAST,
                      sleep=waits.append)
    ranges = [r.get("range") for r in mirror.requests_for(VAL)]
    assert ranges == [None, "bytes=1000-", "bytes=6000-"]
    assert result.resumed and result.attempts == 3 and len(waits) == 2


def test_503_twice_then_success(mirror, sums, tmp_path):
    mirror.fail(VAL, ("status", 503), ("status", 503))
    waits: list[float] = []
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=5, backoff=FAST,
                      sleep=waits.append)
    assert len(mirror.requests_for(VAL)) == 3
    assert waits == [0.001, 0.002]  # exponential backoff
    assert md5_of(result.path) == sums[VAL]


def test_429_honours_retry_after(mirror, sums, tmp_path):
    mirror.fail(VAL, ("status", 429, 3))
    waits: list[float] = []
    download(mirror.url(VAL), tmp_path, md5=sums[VAL], backoff=Backoff(0.001, 2, 10, 0),
             sleep=waits.append)
    assert waits == [3.0]


def test_persistent_5xx_gives_up_after_retries(mirror, sums, tmp_path):
    mirror.fail(VAL, *[("status", 500)] * 4)
    with pytest.raises(ImagenetError, match=r"failed after 3 attempts: HTTP 500"):
        download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=2, backoff=FAST,
                 sleep=lambda s: None)
    assert len(mirror.requests_for(VAL)) == 3


def test_404_fails_fast_without_retry_storm(mirror, tmp_path):
    with pytest.raises(ImagenetError) as err:
        download(mirror.url("no_such.tar"), tmp_path, retries=5, backoff=FAST)
    assert str(err.value).startswith("HTTP 404")
    assert "\n" not in str(err.value)
    assert len(mirror.requests_for("no_such.tar")) == 1
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_is_set_aside_and_never_used(mirror, tmp_path):
    with pytest.raises(ImagenetError, match="md5 mismatch for ILSVRC2012_img_val.tar") as err:
        download(mirror.url(VAL), tmp_path, md5="0" * 32, backoff=FAST)
    aside = tmp_path / (VAL + ".md5-mismatch")
    assert str(aside) in str(err.value)
    assert aside.is_file() and not (tmp_path / VAL).exists()
    assert not (tmp_path / (VAL + ".part")).exists()


def test_known_archive_name_is_checked_against_the_official_md5(mirror, tmp_path):
    # The mini val tar has the official name but not the official bytes.
    with pytest.raises(ImagenetError, match="29b22e2961454d5413ddabcf34fc5622.*--checksums"):
        download(mirror.url(VAL), tmp_path, backoff=FAST)


def test_finished_file_is_verified_and_reused(mirror, sums, tmp_path):
    download(mirror.url(VAL), tmp_path, md5=sums[VAL], backoff=FAST)
    again = download(mirror.url(VAL), tmp_path, md5=sums[VAL], backoff=FAST)
    assert again.reused_in_place and len(mirror.requests_for(VAL)) == 1


def test_local_paths_are_verified_in_place(mini_tiny, sums, tmp_path):
    for source in (str(mini_tiny.val_tar), mini_tiny.val_tar.as_uri()):
        result = download(source, tmp_path / "dl", md5=sums[VAL])
        assert result.path == mini_tiny.val_tar and result.reused_in_place
    assert not (tmp_path / "dl").exists()  # nothing copied
    with pytest.raises(ImagenetError, match="md5 mismatch.*not used"):
        download(str(mini_tiny.val_tar), tmp_path, md5="f" * 32)
    assert mini_tiny.val_tar.is_file()  # a user's own file is never renamed
    with pytest.raises(ImagenetError, match="no such file"):
        download(str(tmp_path / "missing.tar"), tmp_path)


def test_stalled_connection_times_out_and_resumes(mirror, sums, tmp_path):
    mirror.fail(VAL, ("stall", 3))
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], timeout=0.5, backoff=FAST,
                      sleep=lambda s: None)
    assert result.resumed and mirror.requests_for(VAL)[1]["range"].startswith("bytes=")


def test_credentials_are_sent_but_never_shown(mirror, sums, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("IMAGENET_TOKEN", raising=False)
    url = mirror.url(VAL).replace("http://", "http://alice:s3cr3t@")
    mirror.fail(VAL, ("status", 503))
    with caplog.at_level(logging.WARNING, logger="data.download"):
        download(url, tmp_path, md5=sums[VAL], backoff=FAST, sleep=lambda s: None)
    sent = mirror.requests_for(VAL)[0]["authorization"]
    assert sent == "Basic " + base64.b64encode(b"alice:s3cr3t").decode()
    assert caplog.records and "s3cr3t" not in caplog.text and "***@" in caplog.text

    with pytest.raises(ImagenetError) as err:
        download(mirror.url("gone.tar").replace("http://", "http://alice:s3cr3t@"), tmp_path)
    assert "s3cr3t" not in str(err.value) and "alice" not in str(err.value)

    monkeypatch.setenv("IMAGENET_TOKEN", "tok-123")
    download(mirror.url(ilsvrc12.AUX_ARCHIVE), tmp_path / "t", backoff=FAST)
    assert mirror.requests_for(ilsvrc12.AUX_ARCHIVE)[0]["authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(Credentials(token="tok-123"))


def test_mask_url():
    assert mask_url("https://u:p@host:8080/a.tar?sig=abc&x=1") == "https://***@host:8080/a.tar?sig=***&x=1"


def test_one_download_per_file_at_a_time(mirror, sums, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / (VAL + ".part.lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ImagenetError, match="another process is downloading"):
            download(mirror.url(VAL), tmp_path, md5=sums[VAL])
        assert mirror.requests_for(VAL) == []


def test_a_failing_disk_is_not_retried_as_a_network_error(mirror, sums, tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if str(path).endswith(".part") and "b" in mode and "r" not in mode \
            else f

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(ImagenetError, match="cannot write .*No space left on device"):
        download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=5, backoff=FAST)
    assert len(mirror.requests_for(VAL)) == 1


def test_credentials_follow_redirects_only_to_the_same_origin(mirror, sums, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_TOKEN", "tok-456")
    # Same origin: the token goes along.
    mirror.fail("alias.tar", ("redirect", mirror.url(VAL)))
    download(mirror.url("alias.tar"), tmp_path / "a", md5=sums[VAL], filename=VAL)
    assert mirror.requests_for(VAL)[-1]["authorization"] == "Bearer tok-456"
    # Another origin (same server, named differently): it does not.
    other = mirror.url(VAL).replace("127.0.0.1", "localhost")
    mirror.fail("alias.tar", ("redirect", other))
    download(mirror.url("alias.tar"), tmp_path / "b", md5=sums[VAL], filename=VAL)
    assert "authorization" not in mirror.requests_for(VAL)[-1]
    assert mirror.requests_for("alias.tar")[-1]["authorization"] == "Bearer tok-456"


def test_a_failed_download_leaves_only_what_resumes(mirror, mini_tiny, sums, tmp_path):
    """Nothing answers, or the body drops before its first byte: the folders the call made
    are gone (nothing to resume). A drop after some bytes keeps the .part, its sidecar and
    their folder, and the rerun resumes."""
    closed = f"http://127.0.0.1:{_closed_port()}/{VAL}"
    with pytest.raises(ImagenetError, match="cannot connect"):
        download(closed, tmp_path / "new" / "downloads", retries=1, backoff=FAST,
                 sleep=lambda s: None)
    mirror.fail(VAL, ("drop", 0), ("drop", 0))
    with pytest.raises(ImagenetError, match="connection closed at byte 0"):
        download(mirror.url(VAL), tmp_path / "new" / "downloads", md5=sums[VAL], retries=1,
                 backoff=FAST, sleep=lambda s: None)
    assert list(tmp_path.iterdir()) == []

    mirror.fail(VAL, ("drop", 1000))
    with pytest.raises(ImagenetError, match="rerun to resume from 1,000 bytes"):
        download(mirror.url(VAL), tmp_path / "new", md5=sums[VAL], retries=0, backoff=FAST)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [VAL + ".part",
                                                                    VAL + ".part.json"]
    result = download(mirror.url(VAL), tmp_path / "new", md5=sums[VAL], backoff=FAST)
    assert result.resumed and sorted(p.name for p in (tmp_path / "new").iterdir()) == [VAL]


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the retry policy (one)

def _waits_and_error(url: str, tmp_path: Path, **kw) -> tuple[list[float], ImagenetError]:
    waits: list[float] = []
    with pytest.raises(ImagenetError) as err:
        download(url, tmp_path / "dl", retries=5, backoff=FAST, sleep=waits.append, **kw)
    return waits, err.value


def test_what_no_wait_cures_fails_at_once(mirror, tmp_path):
    """No such host, nothing listening, 4xx other than 408/429: one attempt, a final
    DownloadError that says what to fix, and nothing left on disk."""
    cases = {
        f"http://no-such-host.invalid/{VAL}": "does not resolve",
        f"http://127.0.0.1:{_closed_port()}/{VAL}": "connection refused",
    }
    for url, words in cases.items():
        waits, err = _waits_and_error(url, tmp_path)
        assert waits == [] and words in str(err) and "\n" not in str(err), url
        assert isinstance(err, DownloadError) and not err.transient and err.unreachable
    for status in (400, 401, 403, 404, 410, 425):
        mirror.fail(VAL, ("status", status))
        waits, err = _waits_and_error(mirror.url(VAL), tmp_path, md5="0" * 32)
        assert waits == [] and str(err).startswith(f"HTTP {status}"), status
        assert not err.transient
        if status in (401, 403):
            assert "IMAGENET_TOKEN" in str(err) and SECRET_BLOCK in str(err)
    assert not (tmp_path / "dl").exists()


def test_408_429_and_5xx_are_transient(mirror, sums, tmp_path):
    for status in (408, 429, 500, 502, 503, 504):
        mirror.fail(VAL, ("status", status))
    waits: list[float] = []
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=6, backoff=FAST,
                      sleep=waits.append)
    assert len(waits) == 6 and result.attempts == 7


def test_progress_restarts_the_count_of_failures(mirror, mini_tiny, sums, tmp_path):
    """retries bounds consecutive failures without progress: a long download survives more
    isolated drops than `retries`, each resuming; a dead server is still given up on."""
    mirror.fail(VAL, *[("drop", 700)] * 4)
    waits: list[float] = []
    result = download(mirror.url(VAL), tmp_path, md5=sums[VAL], retries=1, backoff=FAST,
                      sleep=waits.append)
    assert result.attempts == 5 and result.resumed and waits == [0.001] * 4
    assert result.path.read_bytes() == mini_tiny.val_tar.read_bytes()


def test_fetch_bytes_uses_the_same_transport(mirror, mini_tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_TOKEN", raising=False)
    body = fetch_bytes(mirror.url("MD5SUMS").replace("http://", "http://u:pw9@"))
    assert body == mini_tiny.md5sums.read_bytes()
    assert mirror.requests_for("MD5SUMS")[0]["authorization"].startswith("Basic ")
    assert fetch_bytes(str(mini_tiny.md5sums)) == body
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        fetch_bytes(mirror.url("nope").replace("http://", "http://u:pw9@"))
    assert "pw9" not in str(err.value)


# ---------------------------------------------------------------- secrets never shown

def test_mask_secrets_in_any_text():
    text = ("failed: http://al:pw1@h:1/a.tar?X-Amz-Signature=s1&X-Amz-Credential=c1&n=2, "
            "'https://h/b?sig=s2'; (ftp://u:pw3@h/c) and https://h/d?access_token=t4.")
    masked = mask_secrets(text)
    for secret in ("pw1", "s1", "c1", "s2", "pw3", "t4"):
        assert secret not in masked, secret
    assert masked.endswith("https://h/d?access_token=***.") and "n=2," in masked


def test_hidden_urls_travel_masked_and_come_back():
    url = "http://al:pw5@127.0.0.1:8/ILSVRC2012_img_train.tar?sig=s5&x=1"
    assert carries_credentials(url) and not carries_credentials(mask_url(url))
    shown = hide_url(url)
    assert shown == "http://***@127.0.0.1:8/ILSVRC2012_img_train.tar?sig=***&x=1"
    assert reveal_url(shown) == url
    assert hide_url("/local/x.tar") == "/local/x.tar" and reveal_url("mini") == "mini"
    # From a secret's list of signed URLs, by the URL without its secrets:
    signed = "https://b.example/v.tar?X-Amz-Signature=s6"
    assert reveal_url("https://b.example/v.tar", {source_key(signed): signed}) == signed
    assert reveal_url("https://b.example/v.tar?X-Amz-Signature=***",
                      {source_key(signed): signed}) == signed
    with pytest.raises(DownloadError, match="X-Amz-Signature is masked.*urls"):
        reveal_url("https://c.example/v.tar?X-Amz-Signature=***")
    # user:pass masked away with nothing to reveal: the credentials come from elsewhere.
    assert reveal_url("http://***@d.example/v.tar") == "http://d.example/v.tar"


def test_query_tokens_are_sent_but_never_shown(mirror, sums, tmp_path, caplog):
    url = mirror.url(VAL) + "?sig=qs3cret&v=1"
    mirror.fail(VAL, ("status", 503), ("drop", 100))
    with caplog.at_level(logging.DEBUG, logger="data.download"):
        download(url, tmp_path, md5=sums[VAL], backoff=FAST, sleep=lambda s: None)
    assert all(r[TARGET] == f"/{VAL}?sig=qs3cret&v=1" for r in mirror.requests_for(VAL))
    assert caplog.records and "qs3cret" not in caplog.text
    mirror.fail(VAL, ("status", 500))
    with pytest.raises(ImagenetError) as err:
        download(url, tmp_path / "x", md5=sums[VAL], retries=0)
    assert "qs3cret" not in str(err.value) and "sig=***" in str(err.value)


def test_credentials_never_follow_a_redirect_to_another_host(mirror, sums, tmp_path):
    """user:pass@ in the URL goes to its own host only, and never inside a redirect's URL."""
    other = mirror.url(VAL).replace("127.0.0.1", "localhost")
    mirror.fail("alias.tar", ("redirect", other.replace("http://", "http://x:leak@")))
    download(mirror.url("alias.tar").replace("http://", "http://al:pw7@"), tmp_path,
             md5=sums[VAL], filename=VAL)
    assert mirror.requests_for("alias.tar")[0]["authorization"] == \
        "Basic " + base64.b64encode(b"al:pw7").decode()
    assert "authorization" not in mirror.requests_for(VAL)[-1]


@pytest.mark.parametrize("url", [
    "http://u:pw1@host:99999/x.tar", "http://u:pw1@[::1/x.tar", "http://u:pw1@/x.tar",
    "http://u:pw1@h\x00/x.tar", "http://u:pw1@" + "a" * 70 + ".com/x.tar",
    "https://u:pw1@h.invalid/?sig=pw1", "ftp://u:pw1@h/x.tar"])
def test_malformed_urls_fail_in_one_masked_line(url, tmp_path):
    with pytest.raises(ImagenetError) as err:
        download(url, tmp_path / "dl", retries=0)
    assert "pw1" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "dl").exists()


def test_ambient_credentials_never_cross_a_network_in_clear(monkeypatch):
    """The environment's (or the Secret block's) credentials apply to every source: they go
    over https, or over http to this machine; user:pass@ in an http URL is the user's choice."""
    from data.download import _split_url

    monkeypatch.setenv("IMAGENET_TOKEN", "tok-789")
    assert _split_url("http://dl.example.org/a.tar.gz", None)[2] is None
    assert _split_url("https://dl.example.org/a.tar", None)[2].token == "tok-789"
    assert _split_url("http://127.0.0.1:8/a.tar", None)[2].token == "tok-789"
    assert _split_url("http://[::1]:8/a.tar", Credentials(token="sb"))[2].token == "sb"
    assert _split_url("http://dl.example.org/a.tar", Credentials(token="sb"))[2] is None
    url, masked, own = _split_url("http://al:pw@dl.example.org/a.tar", None)
    assert (url, masked, own.password) == ("http://dl.example.org/a.tar",
                                           "http://***@dl.example.org/a.tar", "pw")
