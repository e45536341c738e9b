"""Caffe/gflags-compatible flag spellings for the `imagenet` subcommands.

Caffe's tools use gflags, so scripts written for them say `--resize_height=256`, `-gpu 0`,
`--shuffle`, `--shuffle=true` or `--noshuffle`. `add_flag` registers every such spelling of one
flag on an argparse parser, plus the dashed form (`--resize-height`) that Python users expect.
"""
from __future__ import annotations

import argparse
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


def caffe_style_argv(argv: list[str]) -> list[str]:
    """Normalise gflags' `-flag=value` to argparse's `--flag=value` (argparse only splits
    `=` on long options)."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and "=" in arg and len(arg) > 2:
            arg = "-" + arg
        out.append(arg)
    return out
