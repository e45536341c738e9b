"""The `imagenet` command line: Caffe's tools (convert_imageset, compute_image_mean, caffe
train/test/time) under one binary, plus the ILSVRC12 and pipeline commands.

The error contract, the same for every command (nothing here holds logic: every command module
calls the libraries):
- an expected failure (ImagenetError from the libraries, an OSError such as EACCES, EROFS,
  ENOSPC or ENOENT) prints ONE line, `imagenet <command>: error: <what, where, what to do>`,
  and exits 1; bad flags exit 2 with one line (argparse's usage block is left out);
- anything else is a bug: one line naming the exception and the file its full traceback was
  written to (TRACEBACK_DIR_ENV, else the temp folder), exit 70 (sysexits' EX_SOFTWARE);
- IMAGENET_DEBUG=1 lets every exception through with its traceback;
- Ctrl-C exits 130 with one line, SIGTERM 143 (it unwinds like Ctrl-C, so temporary files,
  a half-built LMDB and the pipeline's temporary Prefect server are cleaned up); a closed
  stdout (`| head`) ends quietly.
Commands leave their target as it was when they fail: the libraries write to temporary names
and rename (data/atomic.py, data/lmdb_io.py).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

from data.errors import ImagenetError, check_path_text, os_error_message
from data.textlines import OTHER_LINE_BREAKS
from flows import allocator
from flows.commands import COMMANDS
from flows.flags import caffe_style_argv

# IMAGENET_DEBUG=1: exceptions keep their tracebacks (for bug reports and development).
DEBUG_ENV = "IMAGENET_DEBUG"
# Where the traceback of an unexpected exception is written (default: the temp folder).
TRACEBACK_DIR_ENV = "IMAGENET_TRACEBACK_DIR"
# Exit statuses: an error the user can fix, a bad flag (argparse's), a bug, Ctrl-C.
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130
EXIT_TERMINATED = 128 + 15  # what a shell reports for a process SIGTERM ended
# How much of an unexpected exception's own message goes into the one line.
MAX_DETAIL = 300
# What XLA says when an allocation fails (jaxlib's XlaRuntimeError).
OOM_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory")

# Commands that run a net on XLA: the console script restarts them under jemalloc when it is
# installed (flows/allocator.py; IMAGENET_ALLOCATOR=system turns it off).
ALLOCATOR_COMMANDS = frozenset({"train", "test", "time"})


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (what is wrong, where to read more), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}; see "
                              f"'{self.prog} --help'\n")


def one_line(text: str) -> str:
    """A message on one line: lines joined with '; ' (a pydantic report, say). Only '\n' ends
    a line of the message: the other characters str.splitlines breaks at belong to a name in
    it (a file called a\u2028b.jpg) and are shown escaped, so the terminal line stays one."""
    lines = (part.strip() for part in str(text).replace("\r\n", "\n").split("\n"))
    joined = "; ".join(part for part in lines if part)
    return joined.translate(_ESCAPE_BREAKS)


_ESCAPE_BREAKS = {ord(c): c.encode("unicode_escape").decode("ascii") for c in OTHER_LINE_BREAKS}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python would otherwise end at once without cleaning up: it unwinds
    like Ctrl-C (a KeyboardInterrupt, so `except Exception` blocks let it through)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds (Terminated) instead of killing the process where it stands. Training
    installs its own handler for its duration (snapshot, then stop: model/stop.py)."""
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (a caller of main() in a thread): leave it
        pass


def printable(text: str) -> str:
    """`text` safe to print on any stream: the bytes of a file name that is not UTF-8 (held as
    surrogate escapes since the OS gave them) shown as \\xNN, so the line names the file
    unambiguously instead of failing to encode."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that came from no file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _tolerate_file_names_on_streams() -> None:
    """stdout and stderr write a non-UTF-8 file name's own bytes back (as `ls` does) instead
    of raising UnicodeEncodeError from a print or a log line halfway through a command."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "") == "strict":
            try:
                reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def write_traceback(command: str, err: BaseException) -> Path:
    """The full traceback of `err` in a new file; returns its path."""
    folder = Path(os.environ.get(TRACEBACK_DIR_ENV) or tempfile.gettempdir())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"imagenet-{command}-{stamp}-{os.getpid()}.traceback"
    text = "".join(traceback.format_exception(err))
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as fh:
        fh.write(f"imagenet {command}: argv {sys.argv!r}\n{text}")
    return path


def _check_text_args(args: argparse.Namespace) -> None:
    """No flag value may hold a NUL byte (the OS cannot take one as a path; a caller of main()
    can pass one)."""
    for name, value in vars(args).items():
        if isinstance(value, (str, Path)):
            check_path_text(value, f"--{name}")


def _device_out_of_memory(err: BaseException) -> bool:
    """XLA's allocation failure (jaxlib's XlaRuntimeError, RESOURCE_EXHAUSTED), recognised
    without importing jax."""
    return (type(err).__name__ == "XlaRuntimeError"
            and any(mark in str(err) for mark in OOM_MARKS))


def _report_bug(name: str, err: BaseException) -> int:
    where = (f"imagenet {name}: error: unexpected {type(err).__name__}: "
             f"{printable(one_line(str(err))[:MAX_DETAIL])}")
    try:
        path = write_traceback(name, err)
    except OSError as write_err:
        print(f"{where} (a bug; its traceback could not be written: "
              f"{os_error_message(write_err)}; rerun with {DEBUG_ENV}=1 to see it)",
              file=sys.stderr)
    else:
        print(f"{where} (a bug; full traceback in {path}; please report it with that file)",
              file=sys.stderr)
    return EXIT_BUG


def _quiet_stdout() -> None:
    """stdout's reader went away (`imagenet ... | head`): send the rest to /dev/null so the
    interpreter's final flush does not print a BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="imagenet",
        description="Caffe's ImageNet workflow on JAX/XLA and Prefect. "
        "Flags accept Caffe's spellings (--resize_height=256, -gpu 0, --shuffle=true).",
        epilog=f"A failing command prints one line 'imagenet COMMAND: error: ...' and exits "
        f"{EXIT_ERROR} ({EXIT_USAGE} for a bad flag); a bug exits {EXIT_BUG}, naming the file "
        f"that holds its traceback (${TRACEBACK_DIR_ENV}, else the temp folder). "
        f"{DEBUG_ENV}=1 shows tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `imagenet` command; returns its exit status (see the module docstring).
    argparse's own exits (--help, a bad flag) raise SystemExit as usual."""
    argv = caffe_style_argv(list(sys.argv[1:] if argv is None else argv))
    _tolerate_file_names_on_streams()
    _terminate_like_interrupt()
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    try:
        module_name, summary = COMMANDS[name]
        module = importlib.import_module(module_name)
        prepare = getattr(module, "prepare", None)
        if prepare is not None:  # what must be set before the flags' modules import (Prefect)
            prepare(rest)
        parser = OneLineParser(prog=f"imagenet {name}", description=summary)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        _check_text_args(args)
        return int(module.run(args) or 0)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - the contract: one line for every failure
        if debug_enabled():
            raise
        return _report(name, err)


def _report(name: str, err: BaseException) -> int:
    """Print the one line for `err`; returns the exit status."""
    if isinstance(err, Terminated):
        print(f"imagenet {name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        print(f"imagenet {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(err, BrokenPipeError):
        _quiet_stdout()
        return EXIT_ERROR
    if isinstance(err, ImagenetError):
        message = one_line(str(err))
    elif isinstance(err, OSError):
        message = os_error_message(err)
    elif isinstance(err, MemoryError):
        message = "out of memory; use smaller inputs (batch, resize) or free memory"
    elif _device_out_of_memory(err):
        message = (f"out of device memory ({one_line(str(err))[:MAX_DETAIL]}); use a smaller "
                   "batch_size, --precision=bf16 or more devices")
    else:
        return _report_bug(name, err)
    print(f"imagenet {name}: error: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


def entry() -> None:
    """The `imagenet` console script: main(), after the allocator re-exec of the training
    commands (not done by main() itself, which tests and other Python callers use)."""
    argv = sys.argv[1:]
    if argv and argv[0] in ALLOCATOR_COMMANDS:
        try:
            allocator.reexec_with_allocator(os.environ.get(allocator.CHOICE_ENV, "auto"),
                                            ["-m", "flows.cli", *argv])
        except ImagenetError as err:
            print(f"imagenet: error: {allocator.CHOICE_ENV}: {err}", file=sys.stderr)
            sys.exit(EXIT_ERROR)
    status = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(status)


if __name__ == "__main__":
    entry()
