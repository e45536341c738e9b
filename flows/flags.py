"""Caffe/gflags-compatible flag spellings for the `imagenet` subcommands.

Caffe's tools use gflags, so scripts written for them say `--resize_height=256`, `-gpu 0`,
`--shuffle`, `--shuffle=true` or `--noshuffle`. `add_flag` registers every such spelling of one
flag on an argparse parser, plus the dashed form (`--resize-height`) that Python users expect.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def parse_bool(text: str) -> bool:
    """gflags' boolean values: true/false, yes/no, 1/0 (any case)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, so `--iterations=-5` is refused as a bad
    flag before any work (Caffe's tools take it and do nothing, or loop)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def spellings(name: str) -> list[str]:
    """Every option string for flag `name`: --name, -name and the dashed forms."""
    dashed = name.replace("_", "-")
    out = [f"--{name}", f"-{name}"]
    if dashed != name:
        out += [f"--{dashed}", f"-{dashed}"]
    return out


def add_flag(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    type: Callable[[str], Any] = str,
    default: Any = None,
    help: str = "",
    **kwargs: Any,
) -> None:
    """Add a gflags-style flag; `type=bool` makes a boolean that also accepts --no<name>."""
    if type is bool:
        _bare_bools_mean_true(parser).update(spellings(name))
        parser.add_argument(
            *spellings(name), dest=name, nargs="?", const=True, default=default,
            type=parse_bool, metavar="BOOL", help=help, **kwargs,
        )
        parser.add_argument(
            *[s for s in spellings("no" + name) if s.startswith("--")],
            dest=name, action="store_false", help=argparse.SUPPRESS,
        )
    else:
        parser.add_argument(
            *spellings(name), dest=name, type=type, default=default, help=help, **kwargs
        )


def _bare_bools_mean_true(parser: argparse.ArgumentParser) -> set[str]:
    """The parser's boolean option strings, rewritten `--shuffle` -> `--shuffle=true` before
    parsing: gflags never takes a bool's value from the next word, and create_imagenet.sh puts
    a positional right after `--shuffle` (nargs="?" alone would swallow it)."""
    bools = getattr(parser, "_gflags_bools", None)
    if bools is None:
        bools = parser._gflags_bools = set()  # type: ignore[attr-defined]
        parse_known_args = parser.parse_known_args

        def parse_bare_bools(args=None, namespace=None):  # type: ignore[no-untyped-def]
            args = list(sys.argv[1:] if args is None else args)
            end = args.index("--") if "--" in args else len(args)
            args[:end] = [f"{a}=true" if a in bools else a for a in args[:end]]
            return parse_known_args(args, namespace)

        parser.parse_known_args = parse_bare_bools  # type: ignore[method-assign]
    return bools


def caffe_style_argv(argv: list[str]) -> list[str]:
    """Normalise gflags' `-flag=value` to argparse's `--flag=value` (argparse only splits
    `=` on long options)."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and "=" in arg and len(arg) > 2:
            arg = "-" + arg
        out.append(arg)
    return out


# Caffe's DB backends (--backend): the ones this project writes and reads.
BACKENDS: dict[str, bool] = {"lmdb": True, "leveldb": False}


def check_backend(name: str) -> str:
    """Validate a --backend value as Caffe spells it; LevelDB gets a clear 'not supported'."""
    from data.errors import ImagenetError

    backend = name.lower()
    if backend not in BACKENDS:
        raise ImagenetError(f"unknown --backend {name!r}; valid: {sorted(BACKENDS)}")
    if not BACKENDS[backend]:
        raise ImagenetError(f"--backend={backend} is not supported; use --backend=lmdb "
                            f"(Caffe's default), which every Caffe build reads")
    return backend
