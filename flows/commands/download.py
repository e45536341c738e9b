"""`imagenet download SRC --to DIR [--md5 HEX]`: fetch one archive with resume, retries of
transient failures and md5 verification (data/download.py, httpx). A local SRC is verified in
place, not copied. Credentials: user:pass@ in SRC or IMAGENET_USERNAME/IMAGENET_PASSWORD or
IMAGENET_TOKEN, never shown (URLs are printed masked). Also holds
the byte-progress adapter the other ILSVRC12 commands share.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

from data.download import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, DownloadResult, download
from data.errors import ImagenetError
from data.progress import Progress
from flows.flags import add_flag, int_at_least

MB = 2**20


@contextlib.contextmanager
def byte_progress(desc: str) -> Iterator[Callable[[int, "int | None"], None]]:
    """A (done_bytes, total_bytes) callback drawing data/progress.py's bar (on a terminal)."""
    bar = Progress(None, desc, unit="B", scale=1 / MB, scale_unit="MB")

    def callback(done: int, total: int | None) -> None:
        bar.total = total
        if done < bar.done:  # a restart from zero after the server ignored a Range
            bar.done = 0
        bar.update(done - bar.done)

    with bar:
        yield callback


def describe(result: DownloadResult) -> str:
    how = ("verified in place" if result.reused_in_place else
           f"downloaded{' (resumed)' if result.resumed else ''} at "
           f"{result.bytes / MB / max(result.seconds, 1e-9):,.1f} MB/s")
    check = "md5 ok" if result.md5_verified else "md5 NOT verified (no checksum known)"
    return f"{result.path}: {result.bytes:,} bytes, {how}, {check} {result.md5}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="http(s):// or file:// URL, or a path")
    add_flag(parser, "to", required=True, help="folder to download into")
    add_flag(parser, "md5", help="expected md5 (default: the official one for ILSVRC2012 names)")
    add_flag(parser, "retries", type=int_at_least(0), default=DEFAULT_RETRIES,
             help="retries in a row without progress of transient failures (timeouts, drops, "
             "HTTP 408/429/5xx; each resumes); a missing host, a refused connection or another "
             "4xx fails at once")
    add_flag(parser, "timeout", type=float, default=DEFAULT_TIMEOUT_S,
             help="seconds without data before a connection counts as lost")


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise ImagenetError(f"--timeout must be > 0 seconds, got {args.timeout}")
    with byte_progress("download") as progress:
        result = download(args.source, args.to, md5=args.md5, retries=args.retries,
                          timeout=args.timeout, progress=progress)
    print(describe(result))
    return 0
