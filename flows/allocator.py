"""jemalloc for the commands that train or time a net on the CPU.

XLA's CPU backend allocates its large per-step buffers (im2col columns, activations, gradients:
~1 GB per AlexNet step at batch 32) afresh on every step. glibc's malloc hands buffers this big
back to the kernel when they are freed, and the next step faults them in again page by page.
jemalloc with decay turned off keeps them. Measured on the 2-core machine
(benchmarks/README.md): `imagenet time` on bvlc_alexnet at batch 32 went from 12.5 to 17.2 img/s.

`imagenet train | test | time` therefore re-execute themselves once with jemalloc preloaded
when it is installed (Debian: `apt-get install libjemalloc2`). IMAGENET_ALLOCATOR chooses:
`auto` (the default: jemalloc if found), `jemalloc` (an error if missing) or `system` (never).
benchmarks/train.py uses the same switch for both frameworks it compares.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from data.errors import ImagenetError

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/lib/libjemalloc.so.2")
# Keep freed pages instead of returning them to the kernel (no page faults per step).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ALLOCATORS = ("auto", "jemalloc", "system")
CHOICE_ENV = "IMAGENET_ALLOCATOR"
# Set in the re-executed process: what it runs with, and a guard against a second re-exec.
ACTIVE_ENV = "IMAGENET_ALLOCATOR_ACTIVE"


def find_jemalloc(paths: Sequence[str] = JEMALLOC_PATHS) -> str | None:
    return next((p for p in paths if Path(p).exists()), None)


def allocator_in_use() -> str:
    """'jemalloc' in a process this module re-executed, else 'system'."""
    return os.environ.get(ACTIVE_ENV, "system")


def jemalloc_environment(choice: str, environ: Mapping[str, str],
                         library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None to carry on as is (already re-executed,
    'system', or no jemalloc under 'auto'). `library`: find_jemalloc()'s answer."""
    if choice not in ALLOCATORS:
        raise ImagenetError(f"allocator {choice!r}; valid: {', '.join(ALLOCATORS)}")
    if ACTIVE_ENV in environ or choice == "system":
        return None
    if library is None:
        if choice == "jemalloc":
            raise ImagenetError(f"allocator jemalloc: none of {', '.join(JEMALLOC_PATHS)} "
                                f"exists (Debian: apt-get install libjemalloc2)")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))
    env["MALLOC_CONF"] = JEMALLOC_CONF
    env[ACTIVE_ENV] = "jemalloc"
    return env


def reexec_with_allocator(choice: str, argv: Sequence[str] | None = None) -> None:
    """Replace this process by `python argv...` under jemalloc when `choice` asks for it;
    returns normally when nothing is to be done."""
    env = jemalloc_environment(choice, os.environ, find_jemalloc())
    if env is not None:
        args = list(sys.argv if argv is None else argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *args], env)
