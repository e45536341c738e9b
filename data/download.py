"""Resumable, verified downloads of the ILSVRC12 archives over httpx (no Prefect here).

`download(source, dest_dir)` takes an http(s):// URL, a file:// URL or a plain local path.
- Local files (plain paths and file://) are verified and used in place, never copied.
- HTTP downloads go to `<name>.part` (with a `<name>.part.json` sidecar holding the validator
  ETag/Last-Modified), resume with `Range` + `If-Range` after a drop or a kill, and are renamed
  to `<name>` only once the md5 verifies. A file already at `<name>` is verified and reused.
  A failed download keeps a `.part` that holds bytes (the rerun resumes from it); one that
  received nothing leaves nothing: its empty `.part` and the folders it created are removed.
- md5: the caller's, else the official one for a known archive name (ilsvrc12.KNOWN_ARCHIVES).
  It is computed while the bytes arrive, across retries, so a finished download is not read
  again (after a resume from an earlier process the part is hashed once).

The retry policy (the only one: tasks/acquire.py adds no retries of its own). Every failure is
a `DownloadError` whose `transient` says whether waiting may help:
- transient, retried here with exponential backoff, each retry resuming where the last one
  stopped: timeouts, connections reset or closed mid-body, HTTP 408, 429 and 5xx (Retry-After
  honoured up to the backoff's maximum);
- final at once: a host name that does not resolve, a refused connection, no route to the
  network, a TLS certificate that does not verify, any other 4xx, a checksum mismatch, a disk
  error. None of these goes away by itself; the message says what to fix.
`retries` bounds consecutive failures without progress: an attempt that received bytes starts
the count (and the backoff) again, so a days-long download survives any number of isolated
drops while a dead server is given up on after `retries` retries.

Credentials: `Credentials` (username/password -> Basic, token -> Bearer), from user:pass@ in
the URL, else the caller (tasks/ reads the Prefect Secret block), else IMAGENET_USERNAME /
IMAGENET_PASSWORD / IMAGENET_TOKEN. They are sent only to the scheme, host and port of the URL
given, never on a redirect elsewhere; the caller's and the environment's (which apply to every
source) only over https or to this machine, never in clear across a network. Every URL that reaches a log line, an error or a record is
masked (`mask_url`: userinfo and credential-bearing query values become ***). `hide_url`
registers a credentialed URL in this process and returns its masked form, which can then travel
through logs and stored parameters; `reveal_url` gives the real URL back to the downloader.
"""
from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import functools
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from data import ilsvrc12
from data.errors import ImagenetError

if TYPE_CHECKING:  # httpx is imported when a download starts (0.5 s; extract/convert import us)
    import httpx

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 60.0
# Connecting is quick or it is not happening: a host that drops SYNs should not cost a minute
# per attempt.
CONNECT_TIMEOUT_S = 15.0
DEFAULT_RETRIES = 6
MAX_REDIRECTS = 10
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".part.lock"
META_SUFFIX = ".part.json"
MISMATCH_SUFFIX = ".md5-mismatch"
# HTTP statuses worth retrying: request timeout, rate limit, and every server error. Every
# other 4xx says the request itself is wrong (path, credentials): retrying cannot help.
TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
# Connection failures that no wait cures: no such host, nothing listening, no network.
FINAL_CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH})
AUTH_STATUSES = frozenset({401, 403})
USER_AGENT = "imagenet-pipeline/0.1 (+resumable ILSVRC12 downloader)"
ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN = "IMAGENET_USERNAME", "IMAGENET_PASSWORD", "IMAGENET_TOKEN"
# The Prefect Secret block tasks/acquire.py reads mirror credentials from (named here so that
# messages from the library can point at it; the library itself never reads it).
SECRET_BLOCK = "imagenet-mirror-credentials"
CREDENTIALS_HINT = (f"{ENV_USERNAME}/{ENV_PASSWORD} or {ENV_TOKEN}, or the Prefect Secret block "
                    f"{SECRET_BLOCK!r}")
MASK = "***"
# Query parameters whose values are secrets (signed URLs, API keys): S3's X-Amz-Signature and
# X-Amz-Credential, Azure's sig, GCS's X-Goog-Signature, access_token, api_key, ...
_SECRET_QUERY = re.compile(
    r"(token|key|sig|signature|secret|password|passwd|pwd|auth|credential|session)", re.I)
# A URL inside free text: scheme://, then anything up to whitespace or a closing quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}`]+")


@dataclass(frozen=True)
class Backoff:
    """Wait before retry n (1-based): min(initial * factor**(n-1), maximum) * U(1-jitter, 1)."""

    initial: float = 2.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.25

    def delay(self, attempt: int) -> float:
        base = min(self.initial * self.factor ** (attempt - 1), self.maximum)
        return base * (1.0 - self.jitter * random.random())


class DownloadError(ImagenetError):
    """A download failed; the message (one line, URLs masked) says what and what to do.

    `transient`: a later attempt may succeed without any change (the network or the server
    was down); False for what needs a fix (the URL, the credentials, the network setup, the
    file). `unreachable`: the archive could not be reached at all at that address (no such
    host or file, refused, unauthorised): the caller may say how else to give it.
    `retry_after`: the server's requested wait, if any."""

    def __init__(self, message: str, *, transient: bool, unreachable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(mask_secrets(message))
        self.transient = transient
        self.unreachable = unreachable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials; repr() never shows them."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return (f"Credentials(username={MASK if self.username else None}, "
                f"password={MASK if self.password else None}, "
                f"token={MASK if self.token else None})")

    __str__ = __repr__

    def header(self) -> str | None:
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None:
            raw = f"{self.username}:{self.password or ''}".encode()
            return "Basic " + b64encode(raw).decode("ascii")
        return None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "Credentials | None":
        """From {"username", "password", "token"} (the environment's or a Secret's); None when
        neither a username nor a token is set."""
        values = values or {}
        user, password, token = (values.get(k) or None for k in ("username", "password", "token"))
        if not (user or token):
            return None
        return cls(username=user and str(user), password=password and str(password),
                   token=token and str(token))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Credentials | None":
        env = os.environ if environ is None else environ
        return cls.from_mapping({"username": env.get(ENV_USERNAME),
                                 "password": env.get(ENV_PASSWORD),
                                 "token": env.get(ENV_TOKEN)})


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


# --------------------------------------------------------------------------- URLs and secrets

def _query_pairs(query: str) -> list[tuple[str, str, bool]]:
    """(key, value, had '=') for each &-separated pair, as written (not decoded)."""
    return [(k, v, bool(eq)) for pair in query.split("&") if pair
            for k, eq, v in [pair.partition("=")]]


def _is_secret_key(key: str) -> bool:
    return bool(_SECRET_QUERY.search(urllib.parse.unquote(key)))


def mask_url(url: str) -> str:
    """`url` with any user:password@ and secret-looking query values replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}={MASK}" if _is_secret_key(k) else (f"{k}={v}" if eq else k)
        for k, v, eq in _query_pairs(parts.query))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_secrets(text: str) -> str:
    """`text` with every URL in it masked (mask_url): for messages that quote a value."""

    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        tail = len(url) - len(url.rstrip(".,;:!?"))
        return mask_url(url[:len(url) - tail]) + url[len(url) - tail:]

    return _URL_IN_TEXT.sub(one, text)


def _url_parts(url: str) -> urllib.parse.SplitResult | None:
    """urlsplit of a scheme:// URL; None for anything else or what urlsplit refuses."""
    if not is_url(url):
        return None
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:
        return None


def carries_credentials(url: str) -> bool:
    """Whether `url` holds a credential in clear: a user:password@ / token@ part, or a value of
    a secret-looking query parameter (masked values, ***, do not count). A URL too malformed
    to parse counts when its authority holds an @."""
    parts = _url_parts(url)
    if parts is None:
        return is_url(url) and "@" in url.split("://", 1)[1].split("/", 1)[0]
    if "@" in parts.netloc and parts.netloc.rsplit("@", 1)[0] != MASK:
        return True
    return any(_is_secret_key(k) and v and v != MASK for k, v, _ in _query_pairs(parts.query))


def source_key(url: str) -> str:
    """What identifies a source whatever its secrets: no userinfo, no secret query values.
    The cache key of a download and the lookup key of hidden URLs."""
    parts = _url_parts(url)
    if parts is None:
        return mask_url(url) if is_url(url) else url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{k}={v}" if eq else k for k, v, eq in _query_pairs(parts.query)
                     if not _is_secret_key(k))
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path, query,
                                    parts.fragment))


# Credentialed URLs given in this process (the terminal pipeline's flags), by source_key: the
# flow's parameters carry their masked form, the downloader gets them back from here.
_HIDDEN_URLS: dict[str, str] = {}
_HIDDEN_LOCK = threading.Lock()


def hide_url(url: str) -> str:
    """Keep a credentialed URL in this process only and return its masked form (what may be
    logged or stored); `reveal_url` of the masked form gives `url` back. Other values are
    returned unchanged."""
    if not carries_credentials(url):
        return url
    with _HIDDEN_LOCK:
        _HIDDEN_URLS[source_key(url)] = url
    return mask_url(url)


def reveal_url(url: str, known: Mapping[str, str] | None = None) -> str:
    """The real URL behind a masked one: one hidden in this process (hide_url), else one of
    `known` (credentialed URLs from a secret, by source_key) that matches; `url` itself when it
    carries its credentials or needs none. A `***@` left over is dropped (the credentials come
    from elsewhere); masked query values that nothing reveals are an error (the server needs
    them)."""
    if carries_credentials(url):
        return url
    key = source_key(url)
    with _HIDDEN_LOCK:
        found = _HIDDEN_URLS.get(key)
    if found is None and known:
        found = known.get(key)
    if found is not None:
        return found
    if not is_url(url):
        return url
    parts = urllib.parse.urlsplit(url)
    masked = [k for k, v, _ in _query_pairs(parts.query) if v == MASK and _is_secret_key(k)]
    if masked:
        raise DownloadError(
            f"{mask_url(url)}: the value of {', '.join(masked)} is masked and no URL with it is "
            f"known to this process; give the signed URL in the Prefect Secret block "
            f"{SECRET_BLOCK!r} (key \"urls\") or pass it to `imagenet pipeline` directly",
            transient=False, unreachable=True)
    if "@" in parts.netloc:
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def is_url(source: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source))


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


# --------------------------------------------------------------------------- checksums, disk

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


def local_path(source: str) -> Path:
    """The path of a plain path or file:// source; DownloadError (unreachable) when absent."""
    if source.lower().startswith("file://"):
        parsed = urllib.parse.urlsplit(source)
        if parsed.netloc not in ("", "localhost"):
            raise ImagenetError(f"{mask_url(source)}: file:// URLs must name a local path")
        source = urllib.request.url2pathname(parsed.path)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DownloadError(f"{path}: no such file", transient=False, unreachable=True)
    return path


# --------------------------------------------------------------------------- HTTP

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


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from (httpx wraps httpcore wraps the OSError)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _connect_error(err: Exception, url: httpx.URL, masked: str) -> DownloadError:
    """What a failure to connect means: a final error for what no wait cures (no such host,
    refused, no network, a certificate that does not verify), else transient."""
    where = f"{url.host}:{url.port or {'http': 80, 'https': 443}.get(url.scheme)}"
    for cause in _causes(err):
        if isinstance(cause, socket.gaierror):
            return DownloadError(
                f"cannot connect to {masked}: host name {url.host!r} does not resolve "
                f"({cause.strerror or cause}); nothing was received; check the host name and "
                "that this machine has a network", transient=False, unreachable=True)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return DownloadError(f"TLS certificate check failed for {masked}: "
                                 f"{cause.verify_message or cause}", transient=False,
                                 unreachable=True)
        if isinstance(cause, OSError) and cause.errno in FINAL_CONNECT_ERRNOS:
            what = {errno.ECONNREFUSED: "connection refused (nothing listens there)",
                    errno.ENETUNREACH: "network unreachable (no network?)",
                    errno.EHOSTUNREACH: "no route to the host"}[cause.errno]
            return DownloadError(f"cannot connect to {where} for {masked}: {what}; nothing was "
                                 "received; check the URL's host and port and the network",
                                 transient=False, unreachable=True)
    return DownloadError(f"cannot connect to {where}: {_describe(err)}", transient=True)


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), built once: loading
    the CA bundle costs ~75 ms, per client otherwise."""
    import httpx

    return httpx.create_ssl_context()


def _client(timeout: float) -> httpx.Client:
    import httpx

    # Redirects are followed by _open, which decides where credentials may go.
    return httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
                        follow_redirects=False, headers={"User-Agent": USER_AGENT},
                        verify=_ssl_context())


@contextlib.contextmanager
def _open(client: httpx.Client, url: str, masked: str, headers: dict[str, str],
          credentials: Credentials | None) -> Iterator[httpx.Response]:
    """GET `url` (streamed), following redirects. Authorization goes only to the origin (scheme,
    host, port) of `url`: never to the storage service a mirror redirects to. Raises
    DownloadError for every failure, a final one for a status that no wait cures."""
    import httpx

    auth = credentials.header() if credentials else None
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as err:
        raise DownloadError(f"{masked}: not a valid URL ({err}); check it",
                            transient=False) from None
    origin = _origin(current)
    for _ in range(MAX_REDIRECTS + 1):
        sent = dict(headers)
        if auth and _origin(current) == origin:
            sent["Authorization"] = auth
        try:
            response = client.send(client.build_request("GET", current, headers=sent),
                                   stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise _connect_error(err, current, masked) from None
        except httpx.TimeoutException as err:
            raise DownloadError(f"no answer within the timeout: {_describe(err)}",
                                transient=True) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
            raise DownloadError(f"{mask_url(str(current))}: not a URL we can fetch "
                                f"({mask_secrets(str(err))})", transient=False) from None
        except httpx.TransportError as err:
            raise DownloadError(f"request failed: {_describe(err)}", transient=True) from None
        except UnicodeError as err:  # a host name IDNA cannot encode (a label over 63 bytes)
            raise DownloadError(f"{masked}: not a valid host name ({err}); check it",
                                transient=False, unreachable=True) from None
        if response.is_redirect and response.has_redirect_location:
            location = response.headers["Location"]
            response.close()
            try:
                current = current.join(location)
            except httpx.InvalidURL:
                raise DownloadError(f"{masked}: redirected to an invalid URL "
                                    f"{mask_url(location)!r}", transient=False) from None
            current = current.copy_with(username=None, password=None)
            log.debug("%s: redirected to %s", masked, mask_url(str(current)))
            continue
        try:
            yield response
        finally:
            response.close()
        return
    raise DownloadError(f"{masked}: more than {MAX_REDIRECTS} redirects", transient=False)


def _status_error(response: httpx.Response, masked: str) -> DownloadError:
    status = response.status_code
    text = f"HTTP {status} {response.reason_phrase}".strip()
    if status in TRANSIENT_STATUSES:
        return DownloadError(text, transient=True,
                             retry_after=_parse_retry_after(response.headers.get("Retry-After")))
    hint = (f" (check the credentials: user:password@ in the URL, or {CREDENTIALS_HINT}; those "
            "two are sent over https only, or to this machine)") if status in AUTH_STATUSES else ""
    return DownloadError(f"{text} for {masked}{hint}", transient=False,
                         unreachable=status in AUTH_STATUSES or status in (404, 410))


def _load_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def _retrying(masked: str, attempt_once: Callable[[], Any], progress_mark: Callable[[], int],
              retries: int, backoff: Backoff, sleep: Callable[[float], None],
              then: Callable[[], str]) -> tuple[Any, int]:
    """Run `attempt_once` under the retry policy (module docstring); returns (its result, the
    number of attempts). `progress_mark()` measures progress (bytes on disk) so that an attempt
    that moved forward starts the count of consecutive failures again; `then()` says what to do
    after giving up."""
    attempts = failures = 0
    while True:
        attempts += 1
        before = progress_mark()
        try:
            return attempt_once(), attempts
        except DownloadError as err:
            if not err.transient:
                raise
            failures = 1 if progress_mark() > before else failures + 1
            if failures > retries:
                raise DownloadError(f"download of {masked} failed after {attempts} attempts: "
                                    f"{err}; {then()}", transient=True) from None
            wait = backoff.delay(failures)
            if err.retry_after is not None:
                wait = min(max(wait, err.retry_after), backoff.maximum)
            log.warning("%s: %s; retry %d/%d in %.1f s", masked, err, failures, retries, wait)
            sleep(wait)


def _split_url(source: str, credentials: Credentials | None) -> tuple[str, str,
                                                                       Credentials | None]:
    """(URL to request, its masked form, the credentials to send): user:pass@ in the URL is
    taken out of it (sent as Authorization only); else the caller's, else the environment's."""
    try:
        parts = urllib.parse.urlsplit(source)
        parts.port  # noqa: B018 - a port that is not a number raises here, not mid-download
    except ValueError as err:
        raise ImagenetError(f"{mask_url(source)}: not a valid URL ({err}); check it") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImagenetError(f"{mask_url(source)}: unsupported scheme {parts.scheme!r}; "
                            "valid: http, https, file, or a local path")
    masked = mask_url(source)
    if parts.username is not None:
        source = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        if parts.username != MASK:  # this URL's own: sent as its user chose
            return source, masked, Credentials(urllib.parse.unquote(parts.username),
                                               urllib.parse.unquote(parts.password or ""))
    ambient = credentials or Credentials.from_env()
    if ambient and parts.scheme.lower() == "http" and not _is_loopback(parts.hostname):
        # The environment's or the Secret's credentials apply to every source; over plain http
        # they would cross the network in clear (the default aux URL is http://).
        log.info("%s: plain http: not sending the credentials from %s", masked, CREDENTIALS_HINT)
        ambient = None
    return source, masked, ambient


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def fetch_bytes(source: str, *, max_bytes: int = 1 << 20, credentials: Credentials | None = None,
                timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep
                ) -> bytes:
    """A small file (a checksum list) into memory: URL (same transport, credentials and retry
    policy as download) or local path. More than `max_bytes` is an error."""
    source = os.fspath(source)
    if not is_url(source) or source.lower().startswith("file://"):
        path = local_path(source)
        if path.stat().st_size > max_bytes:
            raise ImagenetError(f"{path}: larger than {max_bytes:,} bytes; not a checksum list")
        return path.read_bytes()
    url, masked, credentials = _split_url(source, credentials)

    def once() -> bytes:
        body = bytearray()
        with _open(client, url, masked, {"Accept-Encoding": "identity"}, credentials) as resp:
            if resp.status_code != 200:
                raise _status_error(resp, masked)
            try:
                for chunk in resp.iter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        raise DownloadError(f"{masked}: larger than {max_bytes:,} bytes; not a "
                                            "checksum list", transient=False)
            except _transport_errors() as err:
                raise DownloadError(f"connection lost at byte {len(body):,}: {_describe(err)}",
                                    transient=True) from None
        return bytes(body)

    with _client(timeout) as client:
        body, _ = _retrying(masked, once, lambda: 0, retries, backoff, sleep,
                            lambda: "check the URL and the network, then rerun")
    return body


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TransportError, OSError)


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
    docstring. Raises ImagenetError (DownloadError for the transfer itself) with one line
    saying what failed and where."""
    start = time.monotonic()
    source = os.fspath(source)
    if not is_url(source) or source.lower().startswith("file://"):
        path = local_path(source)
        want = expected_md5(path.name, md5)
        return _verify_local(path, want, bool(md5), progress, start, set_aside=False)

    url, masked, credentials = _split_url(source, credentials)
    name = filename or os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
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
                return _download_http(url, masked, name, final, part, meta_path, want,
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


@dataclass
class _Transfer:
    """One file's download across its attempts (under the per-file lock)."""

    url: str
    masked: str
    part: Path
    meta_path: Path
    credentials: Credentials | None
    progress: ProgressFn | None
    hasher: _StreamHash = field(default_factory=_StreamHash)
    resumed: bool = False

    def size(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def attempt(self, client: httpx.Client) -> None:
        """One HTTP request that appends to the part file; sets `resumed` when it resumed."""
        have = self.size()
        meta = _load_meta(self.meta_path) if have else {}
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            # If-Range: the server sends the whole file (200) if it changed since the partial.
            etag = meta.get("etag")
            validator = etag if etag and not str(etag).startswith("W/") else None
            validator = validator or meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        with _open(client, self.url, self.masked, headers, self.credentials) as response:
            self._receive(response, have, meta)

    def _receive(self, response: httpx.Response, have: int, meta: dict) -> None:
        status, headers, part = response.status_code, response.headers, self.part
        if status == 416 and have:
            total = _content_range_total(headers.get("Content-Range"))
            if total is not None and total == have:
                self.resumed = True  # the partial file is already complete
                return
            part.unlink(missing_ok=True)  # longer than the file now is: start over
            raise DownloadError(f"HTTP 416 for a resume at byte {have:,}; restarting",
                                transient=True)
        if status not in (200, 206):
            raise _status_error(response, self.masked)
        length = headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            if _content_range_start(headers.get("Content-Range")) != have:
                part.unlink(missing_ok=True)
                raise DownloadError(f"server resumed at the wrong offset "
                                    f"({headers.get('Content-Range')!r}, wanted {have})",
                                    transient=True)
            mode, offset = "ab", have
            self.resumed = True
            self.hasher.catch_up(part, have)
            total = _content_range_total(headers.get("Content-Range"))
        else:  # 200: a fresh start (no partial, or the server ignored/refused the Range)
            mode, offset = "wb", 0
            self.hasher.restart()
            total = length
            meta = {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                    "total": total}
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"")
            _save_meta(self.meta_path, meta)
        if total is not None:
            check_free_space(part.parent, total - offset, part.name)
        done = offset
        try:
            out = open(part, mode)
        except OSError as err:
            raise ImagenetError(f"cannot write {part}: {err.strerror or err}") from None
        with out:
            chunks = response.iter_raw()  # whatever arrived: a drop keeps every byte received
            while True:
                try:
                    chunk = next(chunks, b"")
                except _transport_errors() as err:
                    what = ("closed" if "peer closed" in str(err) or "incomplete" in str(err)
                            else "lost")
                    of = f" of {total:,}" if total is not None else ""
                    raise DownloadError(f"connection {what} at byte {done:,}{of}: "
                                        f"{_describe(err)}", transient=True) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:  # a full disk is not a network problem: no retry
                    raise ImagenetError(f"cannot write {part} at byte {done:,}: "
                                        f"{err.strerror or err}") from None
                self.hasher.update(chunk)
                done += len(chunk)
                if self.progress is not None:
                    self.progress(done, total)
        if total is not None and done != total:
            raise DownloadError(f"connection closed at byte {done:,} of {total:,}",
                                transient=True)
        if total is None and meta.get("total") is None and length is None:
            log.warning("%s: server sent no length; cannot tell a truncated body", self.masked)


def _download_http(url: str, masked: str, name: str, final: Path, part: Path,
                   meta_path: Path, want: str | None, user_md5: bool, retries: int,
                   backoff: Backoff, progress: ProgressFn | None,
                   credentials: Credentials | None, timeout: float,
                   sleep: Callable[[float], None], start: float) -> DownloadResult:
    """The retry loop of download() for http(s) URLs (under the per-file lock)."""
    transfer = _Transfer(url, masked, part, meta_path, credentials, progress)

    def then() -> str:
        have = transfer.size()
        return (f"rerun to resume from {have:,} bytes" if have else
                "nothing was received; check the URL and the network, then rerun")

    with _client(timeout) as client:
        _, attempts = _retrying(masked, lambda: transfer.attempt(client), transfer.size,
                                retries, backoff, sleep, then)

    size = part.stat().st_size
    transfer.hasher.catch_up(part, size)
    got = transfer.hasher.md5.hexdigest()
    if want and got != want:
        aside = final.parent / (name + MISMATCH_SUFFIX)
        os.replace(part, aside)
        meta_path.unlink(missing_ok=True)
        raise ImagenetError(_mismatch_message(name, want, got, aside, user_md5))
    os.replace(part, final)
    meta_path.unlink(missing_ok=True)
    size = final.stat().st_size
    if not want:
        log.warning("%s: no checksum known; md5 is %s (pass --md5 to verify)", final, got)
    return DownloadResult(path=final, bytes=size, md5=got, resumed=transfer.resumed,
                          seconds=time.monotonic() - start, reused_in_place=False,
                          md5_verified=want is not None, attempts=attempts)
