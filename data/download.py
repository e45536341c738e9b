"""Resumable, verified downloads of the ILSVRC12 archives (standard library only).

`download(source, dest_dir)` takes an http(s):// URL, a file:// URL or a plain local path.
- Local files (plain paths and file://) are verified and used in place, never copied.
- HTTP downloads go to `<name>.part` (with a `<name>.part.json` sidecar holding the validator
  ETag/Last-Modified), resume with `Range` + `If-Range` after a drop or a kill, and are renamed
  to `<name>` only once the md5 verifies. A file already at `<name>` is verified and reused.
  A failed download keeps a `.part` that holds bytes (the rerun resumes from it); one that
  received nothing leaves nothing: its empty `.part` and the folders it created are removed.
- Transient failures (timeouts, resets, truncated bodies, HTTP 5xx, 408, 429 with Retry-After)
  are retried with exponential backoff, each retry resuming where the last one stopped. Other
  4xx fail at once. A checksum mismatch renames the file to `<name>.md5-mismatch` and fails.
- md5: the caller's, else the official one for a known archive name (ilsvrc12.KNOWN_ARCHIVES).
- Credentials: `Credentials` (username/password -> Basic, token -> Bearer), from the caller
  (tasks/ may read a Prefect Secret) or from IMAGENET_USERNAME / IMAGENET_PASSWORD /
  IMAGENET_TOKEN, or user:pass@ in the URL. They are sent only to the URL's own host (not
  across redirects), and every URL that reaches a log line or error is masked.
"""
from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data import ilsvrc12
from data.errors import ImagenetError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 5
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".part.lock"
META_SUFFIX = ".part.json"
MISMATCH_SUFFIX = ".md5-mismatch"
# HTTP statuses worth retrying: request timeout, rate limit, and every server error.
RETRY_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
USER_AGENT = "imagenet-pipeline/0.1 (+resumable ILSVRC12 downloader)"
ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN = "IMAGENET_USERNAME", "IMAGENET_PASSWORD", "IMAGENET_TOKEN"
# Query parameters whose values are secrets (signed URLs, API keys).
_SECRET_QUERY = re.compile(r"(token|key|sig|signature|secret|password|auth|credential)", re.I)


@dataclass(frozen=True)
class Backoff:
    """Wait before retry n (1-based): min(initial * factor**(n-1), maximum) * U(1-jitter, 1)."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.25

    def delay(self, attempt: int) -> float:
        base = min(self.initial * self.factor ** (attempt - 1), self.maximum)
        return base * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials; repr() never shows them."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return (f"Credentials(username={'***' if self.username else None}, "
                f"password={'***' if self.password else None}, "
                f"token={'***' if self.token else None})")

    __str__ = __repr__

    def header(self) -> str | None:
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None:
            raw = f"{self.username}:{self.password or ''}".encode()
            return "Basic " + b64encode(raw).decode("ascii")
        return None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Credentials | None":
        env = os.environ if environ is None else environ
        user, password, token = env.get(ENV_USERNAME), env.get(ENV_PASSWORD), env.get(ENV_TOKEN)
        if not (user or token):
            return None
        return cls(username=user, password=password, token=token)


@dataclass
class DownloadResult:
    path: Path
    bytes: int
    md5: str
    resumed: bool  # some bytes came from an earlier, interrupted attempt
    seconds: float
    reused_in_place: bool  # a local file (or an earlier finished download) was verified, not fetched
    md5_verified: bool = True  # False when no checksum was known (the md5 is still reported)
    attempts: int = 0  # HTTP requests made


class _StreamHash:
    """md5 of the .part file kept up to date while it is written, so a finished download needs
    no second read (147 GB). After a resume the existing part is hashed once first."""

    def __init__(self) -> None:
        self.md5, self.bytes = hashlib.md5(), 0

    def restart(self) -> None:
        self.md5, self.bytes = hashlib.md5(), 0

    def catch_up(self, part: Path, size: int) -> None:
        """Make the hash cover exactly the first `size` bytes of `part`."""
        if self.bytes == size:
            return
        self.restart()
        with open(part, "rb") as f:
            while self.bytes < size and (chunk := f.read(min(CHUNK_BYTES, size - self.bytes))):
                self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.bytes += len(chunk)


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def mask_url(url: str) -> str:
    """`url` with any user:password@ and secret-looking query values replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if _SECRET_QUERY.search(k) else (f"{k}={v}" if v or "=" in pair else k)
        for pair in parts.query.split("&") if pair
        for k, _, v in [pair.partition("=")]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_url(source: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source))


def md5_of(path: Path, progress: ProgressFn | None = None) -> str:
    """md5 hex digest of a file, read in CHUNK_BYTES pieces."""
    h = hashlib.md5()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


def expected_md5(name: str, md5: str | None) -> str | None:
    """The checksum to verify `name` against: the caller's, else the official one if known."""
    if md5:
        if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
            raise ImagenetError(f"md5 {md5!r} for {name} is not 32 hex digits")
        return md5.lower()
    known = ilsvrc12.known_archive(name)
    return known.md5 if known else None


def _mismatch_message(name: str, want: str, got: str, where: Path | None, user_given: bool
                      ) -> str:
    hint = "" if user_given else (
        " (that is the official ILSVRC2012 md5; for another archive under this name pass its "
        "md5 with --md5 or --checksums)")
    fate = f"kept aside as {where}" if where else "not used"
    return f"md5 mismatch for {name}: expected {want}, got {got}{hint}; {fate}"


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Fail before starting when `directory` lacks `needed` bytes."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ImagenetError(
            f"not enough free space for {what} in {directory}: need {needed:,} bytes, "
            f"{free:,} free")


def _verify_local(path: Path, want: str | None, user_given: bool, progress: ProgressFn | None,
                  start: float, *, set_aside: bool) -> DownloadResult:
    got = md5_of(path, progress)
    if want and got != want:
        if set_aside:
            aside = path.with_name(path.name + MISMATCH_SUFFIX)
            os.replace(path, aside)
            raise ImagenetError(_mismatch_message(path.name, want, got, aside, user_given))
        # A user's own file is never moved: report it and use nothing.
        raise ImagenetError(_mismatch_message(str(path), want, got, None, user_given))
    return DownloadResult(path=path, bytes=path.stat().st_size, md5=got, resumed=False,
                          seconds=time.monotonic() - start, reused_in_place=True,
                          md5_verified=want is not None)


class _SameOriginAuthRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, carrying Authorization only to the same scheme, host and port (urllib
    drops unredirected headers on every redirect; sending them elsewhere would leak them, e.g.
    to the storage service a mirror redirects to)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth is not None:
            old_parts, new_parts = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(
                new.full_url)
            if (old_parts.scheme, old_parts.netloc) == (new_parts.scheme, new_parts.netloc):
                new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_SameOriginAuthRedirect)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$", (value or "").strip())
    return int(m.group(1)) if m else None


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"^bytes\s+(\d+)-\d+/(?:\d+|\*)$", (value or "").strip())
    return int(m.group(1)) if m else None


def _load_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def download(
    source: str | os.PathLike,
    dest_dir: Path | str,
    *,
    md5: str | None = None,
    filename: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff = Backoff(),
    progress: ProgressFn | None = None,
    credentials: Credentials | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadResult:
    """Fetch `source` into `dest_dir` (or verify it in place when it is local); see the module
    docstring. Raises ImagenetError with one line saying what failed and where."""
    start = time.monotonic()
    source = os.fspath(source)
    if not _is_url(source) or source.lower().startswith("file://"):
        if source.lower().startswith("file://"):
            parsed = urllib.parse.urlsplit(source)
            if parsed.netloc not in ("", "localhost"):
                raise ImagenetError(f"{source}: file:// URLs must name a local path")
            source = urllib.request.url2pathname(parsed.path)
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImagenetError(f"{path}: no such file")
        want = expected_md5(path.name, md5)
        return _verify_local(path, want, bool(md5), progress, start, set_aside=False)

    try:
        parts = urllib.parse.urlsplit(source)
        parts.port  # noqa: B018 - a port that is not a number raises here, not mid-download
    except ValueError as err:
        raise ImagenetError(f"{mask_url(source)}: not a valid URL ({err}); check it") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImagenetError(f"{mask_url(source)}: unsupported scheme {parts.scheme!r}; "
                            "valid: http, https, file, or a local path")
    masked = mask_url(source)
    if parts.username is not None:  # user:pass@ in the URL: use it, but never send it as-is
        credentials = credentials or Credentials(urllib.parse.unquote(parts.username),
                                                 urllib.parse.unquote(parts.password or ""))
        netloc = parts.netloc.rsplit("@", 1)[1]
        source = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    credentials = credentials or Credentials.from_env()
    name = filename or os.path.basename(urllib.parse.unquote(parts.path)) or None
    if not name or name in (".", "..") or os.path.basename(name) != name:
        raise ImagenetError(f"{masked}: cannot tell a plain file name from the URL "
                            f"(got {name!r}); pass filename=")
    dest_dir = Path(dest_dir)
    created = _missing_folders(dest_dir)
    final = dest_dir / name
    part = dest_dir / (name + PART_SUFFIX)
    meta_path = dest_dir / (name + META_SUFFIX)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        want = expected_md5(name, md5)
        if final.is_file():  # finished earlier (only verified files are renamed to `final`)
            log.info("%s already present; verifying", final)
            return _verify_local(final, want, bool(md5), progress, start, set_aside=True)
        with _exclusive(dest_dir / (name + LOCK_SUFFIX), name):
            had_part = part.exists()
            try:
                return _download_http(source, masked, name, final, part, meta_path, want,
                                      bool(md5), retries, backoff, progress, credentials,
                                      timeout, sleep, start)
            except BaseException:
                _remove_empty_part(part, meta_path, had_part)
                raise
    except BaseException:
        _remove_empty_folders(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """The folders that creating `folder` would create, deepest first."""
    missing = []
    for path in [folder, *folder.parents]:
        if os.path.lexists(path):
            break
        missing.append(path)
    return missing


def _remove_empty_part(part: Path, meta_path: Path, had_part: bool) -> None:
    """After a failed download (under the file's lock): a `.part` that holds bytes stays with
    its sidecar, since a rerun resumes from it and the error says so; an empty one this call
    created (the connection failed before the first byte) is removed with its sidecar."""
    with contextlib.suppress(OSError):
        if not had_part and part.exists() and part.stat().st_size == 0:
            part.unlink()
        if not part.exists():
            meta_path.unlink(missing_ok=True)


def _remove_empty_folders(created: list[Path]) -> None:
    """The folders a failed download created, deepest first, while they are empty: a
    download that left nothing to resume leaves the disk as it was."""
    with contextlib.suppress(OSError):
        for folder in created:
            folder.rmdir()  # raises (and stops) at the first folder that is not empty


@contextlib.contextmanager
def _exclusive(lock_path: Path, name: str) -> Iterator[None]:
    """One download per file at a time: two writers appending to one .part corrupt it. The
    lock file is removed afterwards; a process that locked a file just unlinked by its holder
    sees the inode changed and backs off like one that found it locked."""
    busy = ImagenetError(f"another process is downloading {name} into {lock_path.parent} "
                         f"(it holds {lock_path})")
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:
            ours = os.fstat(lock.fileno()).st_ino
            same = lock_path.exists() and os.stat(lock_path).st_ino == ours
            if not same:
                raise busy
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_http(source: str, masked: str, name: str, final: Path, part: Path,
                   meta_path: Path, want: str | None, user_md5: bool, retries: int,
                   backoff: Backoff, progress: ProgressFn | None,
                   credentials: Credentials | None, timeout: float,
                   sleep: Callable[[float], None], start: float) -> DownloadResult:
    """The retry loop of download() for http(s) URLs (under the per-file lock)."""
    dest_dir = final.parent
    resumed_any = False
    hasher = _StreamHash()
    attempt = 0
    requests = 0
    while True:
        attempt += 1
        try:
            requests += 1
            resumed = _fetch_once(source, masked, part, meta_path, credentials, timeout,
                                  progress, hasher)
            resumed_any = resumed_any or resumed
            break
        except _Transient as err:
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                then = (f"rerun to resume from {have:,} bytes" if have else
                        "nothing was received; check the URL and the network, then rerun")
                raise ImagenetError(f"download of {masked} failed after {attempt} attempts: "
                                    f"{err}; {then}") from None
            wait = backoff.delay(attempt)
            if err.retry_after is not None:
                wait = min(max(wait, err.retry_after), backoff.maximum)
            log.warning("%s: %s; retry %d/%d in %.1f s", masked, err, attempt, retries, wait)
            sleep(wait)

    size = part.stat().st_size
    hasher.catch_up(part, size)
    got = hasher.md5.hexdigest()
    if want and got != want:
        aside = dest_dir / (name + MISMATCH_SUFFIX)
        os.replace(part, aside)
        meta_path.unlink(missing_ok=True)
        raise ImagenetError(_mismatch_message(name, want, got, aside, user_md5))
    os.replace(part, final)
    meta_path.unlink(missing_ok=True)
    size = final.stat().st_size
    if not want:
        log.warning("%s: no checksum known; md5 is %s (pass --md5 to verify)", final, got)
    return DownloadResult(path=final, bytes=size, md5=got, resumed=resumed_any,
                          seconds=time.monotonic() - start, reused_in_place=False,
                          md5_verified=want is not None, attempts=requests)


def _fetch_once(url: str, masked: str, part: Path, meta_path: Path,
                credentials: Credentials | None, timeout: float,
                progress: ProgressFn | None, hasher: _StreamHash) -> bool:
    """One HTTP request that appends to `part`; returns whether it resumed. Raises _Transient
    for what is worth retrying and ImagenetError for what is not."""
    have = part.stat().st_size if part.exists() else 0
    meta = _load_meta(meta_path) if have else {}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                   "Accept-Encoding": "identity"})
    auth = credentials.header() if credentials else None
    if auth:
        # Unredirected: only _SameOriginAuthRedirect forwards it, and only to the same origin.
        request.add_unredirected_header("Authorization", auth)
    if have:
        request.add_header("Range", f"bytes={have}-")
        # If-Range: the server sends the whole file (200) if it changed since the partial.
        validator = meta.get("etag") if not str(meta.get("etag", "")).startswith("W/") else None
        validator = validator or meta.get("last_modified")
        if validator:
            request.add_header("If-Range", validator)
    try:
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        retry_after = _parse_retry_after(err.headers.get("Retry-After") if err.headers else None)
        err.close()
        if err.code == 416 and have:
            total = _content_range_total(err.headers.get("Content-Range"))
            if total is not None and total == have:
                return True  # the partial file is already complete
            part.unlink(missing_ok=True)  # longer than the file now is: start over
            raise _Transient(f"HTTP 416 for a resume at byte {have:,}; restarting") from None
        if err.code in RETRY_STATUSES:
            raise _Transient(f"HTTP {err.code} {err.reason}", retry_after) from None
        hint = " (check IMAGENET_USERNAME/IMAGENET_PASSWORD or IMAGENET_TOKEN)" \
            if err.code in (401, 403) else ""
        raise ImagenetError(f"HTTP {err.code} {err.reason} for {masked}{hint}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ImagenetError(f"TLS certificate check failed for {masked}: {reason}") from None
        if isinstance(reason, (OSError, socket.timeout)):
            raise _Transient(f"cannot connect: {reason}") from None
        raise ImagenetError(f"cannot fetch {masked}: {reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise _Transient(f"{type(err).__name__}: {err}") from None

    with response:
        status = response.status
        headers = response.headers
        length = headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            if _content_range_start(headers.get("Content-Range")) != have:
                part.unlink(missing_ok=True)
                raise _Transient(f"server resumed at the wrong offset "
                                 f"({headers.get('Content-Range')!r}, wanted {have})")
            mode, resumed, offset = "ab", True, have
            hasher.catch_up(part, have)
            total = _content_range_total(headers.get("Content-Range"))
        else:  # 200: a fresh start (no partial, or the server ignored/refused the Range)
            mode, resumed, offset = "wb", False, 0
            hasher.restart()
            total = length
            meta = {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                    "total": total}
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"")
            _save_meta(meta_path, meta)
        if total is not None:
            check_free_space(part.parent, total - offset, part.name)
        done = offset
        try:
            out = open(part, mode)
        except OSError as err:
            raise ImagenetError(f"cannot write {part}: {err.strerror or err}") from None
        with out:
            while True:
                try:
                    # read1: whatever has arrived, so a stall or drop keeps every byte received.
                    chunk = response.read1(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as err:
                    # socket.timeout, ConnectionResetError, IncompleteRead: keep what arrived.
                    raise _Transient(f"connection lost at byte {done:,}: "
                                     f"{type(err).__name__}") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:  # a full disk is not a network problem: no retry
                    raise ImagenetError(f"cannot write {part} at byte {done:,}: "
                                        f"{err.strerror or err}") from None
                hasher.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if total is not None and done != total:
            raise _Transient(f"connection closed at byte {done:,} of {total:,}")
        if total is None and meta.get("total") is None and length is None:
            log.warning("%s: server sent no length; cannot tell a truncated body", masked)
    return resumed
