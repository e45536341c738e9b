"""A real HTTP mirror on 127.0.0.1 for the download tests, with injectable faults.

`MirrorServer(root)` serves the files under `root` like a static mirror would (Content-Length,
ETag, Last-Modified, Accept-Ranges, single `Range: bytes=a-[b]` requests honoured with 206 and
`If-Range`, 416 past the end; a query string is ignored) and records every request (path +
headers, and the target as sent under TARGET). Faults are queued per
file name and consumed one per request:
  ("status", code[, retry_after])  answer with that status instead of the file;
  ("drop", nbytes)                 send the headers of the full answer, then nbytes of body, then
                                   close the connection (a dropped download);
  ("stall", seconds)               send the headers and half the body, then go quiet;
  ("redirect", url)                answer 302 with Location: url.
The server runs in daemon threads and shuts itself down after `max_lifetime` seconds even if a
test forgets to, so it can never outlive the test run.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.server
import os
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

CHUNK = 64 * 1024
# requests_for(name)[i][TARGET]: the request's target (path and query) as the client sent it.
TARGET = ":target"


class MirrorServer:
    def __init__(self, root: Path, max_lifetime: float = 120.0) -> None:
        self.root = Path(root)
        self.faults: dict[str, deque] = defaultdict(deque)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)  # short poll: quick shutdown
        self._timer = threading.Timer(max_lifetime, self.stop)
        self._timer.daemon = True

    # ------------------------------------------------------------------ control
    def __enter__(self) -> "MirrorServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def fail(self, name: str, *faults: tuple) -> None:
        self.faults[name].extend(faults)

    def requests_for(self, name: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for p, h in self.requests if p == f"/{name}"]

    # ------------------------------------------------------------------ serving
    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            headers = {k.lower(): v for k, v in h.headers.items()}
            headers[TARGET] = h.path  # the request target as sent, query included
            self.requests.append((path, headers))
            queue = self.faults.get(path.lstrip("/"))
            fault = queue.popleft() if queue else None
        if fault and fault[0] == "redirect":
            h.send_response(302)
            h.send_header("Location", fault[1])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if fault and fault[0] == "status":
            h.send_response(fault[1])
            if len(fault) > 2:
                h.send_header("Retry-After", str(fault[2]))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        file = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in file.parents or not file.is_file():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        stat = file.stat()
        size = stat.st_size
        etag = '"' + hashlib.md5(f"{size}-{stat.st_mtime_ns}".encode()).hexdigest() + '"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if rng and (if_range is None or if_range in (etag, last_modified)):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        length = end - start + 1
        h.send_response(status)
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        h.send_header("Last-Modified", last_modified)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        limit = length
        if fault and fault[0] == "drop":
            limit = min(length, fault[1])
        elif fault and fault[0] == "stall":
            limit = length // 2
        with open(file, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < limit:
                chunk = f.read(min(CHUNK, limit - sent))
                if not chunk:
                    break
                h.wfile.write(chunk)
                sent += len(chunk)
        h.wfile.flush()
        if fault and fault[0] == "stall":
            time.sleep(fault[1])
        if sent < length:
            h.close_connection = True  # the client sees the body end early
