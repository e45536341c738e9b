"""The `imagenet` command line: Caffe's tools (convert_imageset, compute_image_mean, caffe
train/test/time) under one binary, plus the ILSVRC12 and pipeline commands.

Errors a user can fix (ImagenetError, missing files) print one line and exit 1; usage errors
exit 2. Nothing here holds logic: every command module calls the libraries.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from data.errors import ImagenetError
from flows import allocator
from flows.commands import COMMANDS
from flows.flags import caffe_style_argv

# Commands that run a net on XLA: the console script restarts them under jemalloc when it is
# installed (flows/allocator.py; IMAGENET_ALLOCATOR=system turns it off).
ALLOCATOR_COMMANDS = frozenset({"train", "test", "time"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagenet",
        description="Caffe's ImageNet workflow on JAX/XLA and Prefect. "
        "Flags accept Caffe's spellings (--resize_height=256, -gpu 0, --shuffle=true).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = caffe_style_argv(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"imagenet {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ImagenetError as err:
        print(f"imagenet {name}: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"imagenet {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imagenet {name}: interrupted", file=sys.stderr)
        return 130


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
            sys.exit(1)
    sys.exit(main())


if __name__ == "__main__":
    entry()
