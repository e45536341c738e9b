"""Which devices train (caffe.cpp's --gpu), across one or several processes.

`select_devices` applies --gpu ("all", "0,1", -1 for CPU, or the solver_mode default) to each
process's own devices and lists them process by process, so each process's devices hold one
contiguous share of the global batch; `local_copy` reads this process's copy of replicated
arrays.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import jax

from data.errors import ImagenetError

# Caffe's solver_mode enum value for CPU (caffe.proto SolverParameter.SolverMode).
SOLVER_MODE_CPU = 0


def select_devices(devices: str | Sequence[int] | None, solver_mode: int | None = None,
                   device_id: int = 0) -> list[jax.Device]:
    """--gpu semantics: "all", a list of indices, [-1] (CPU), or None (the solver_mode
    default: the first device). With several processes (jax.distributed) every process applies
    the same choice to its own local devices; the result lists them all, process by process,
    so each process's devices hold one contiguous share of the global batch."""
    if jax.process_count() == 1:
        return _select_among(jax.devices(), jax.devices("cpu"), devices, solver_mode, device_id)
    chosen: list[jax.Device] = []
    for p in range(jax.process_count()):
        local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        cpus = sorted((d for d in jax.devices("cpu") if d.process_index == p),
                      key=lambda d: d.id)
        chosen += _select_among(local, cpus, devices, solver_mode, device_id)
    per_process = Counter(d.process_index for d in chosen)
    if len(set(per_process.values())) != 1:
        raise ImagenetError(f"processes have different device counts {dict(per_process)}: "
                            "give every process the same number of devices (--gpu)")
    return chosen


def _select_among(avail: Sequence[jax.Device], cpus: Sequence[jax.Device],
                  devices: str | Sequence[int] | None, solver_mode: int | None,
                  device_id: int) -> list[jax.Device]:
    """select_devices on one list of devices (one process's, or all with one process)."""
    if devices is None:
        # caffe.cpp: without --gpu the solver's solver_mode decides (GPU: device_id)
        if solver_mode == SOLVER_MODE_CPU:
            return [cpus[0]]
        return [avail[device_id] if 0 <= device_id < len(avail) else avail[0]]
    if isinstance(devices, str):
        if devices == "all":
            return list(avail)
        devices = [int(d) for d in devices.split(",") if d.strip()]
    devices = list(devices)
    if devices == [-1]:
        return [cpus[0]]
    bad = [d for d in devices if not 0 <= d < len(avail)]
    if bad or not devices:
        raise ImagenetError(f"device ids {devices} invalid; {len(avail)} devices available: "
                            f"{', '.join(str(d) for d in avail)}")
    if len(set(devices)) != len(devices):
        raise ImagenetError(f"device ids repeated: {devices}")
    return [avail[d] for d in devices]


def local_copy(tree: Any) -> Any:
    """This process's copy of replicated arrays: with several processes a global array spans
    devices this process cannot read, but every process holds all of a replicated one."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)
