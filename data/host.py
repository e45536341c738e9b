"""The host as the data stages see it: the cores this process may use.

A module of its own so that light commands (compute-image-mean) get it without importing the
conversion machinery (data/convert.py: multiprocessing, image decoding, downloads).
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (taskset, cgroups' cpusets), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


__all__ = ["available_cores"]
