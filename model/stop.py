"""Stopping a run early and cleanly: signals, and the multi-process stop vote.

- `StopRequest`: while active, SIGINT/SIGTERM ask the Solver to snapshot and stop after the
  current iteration (Caffe's --sigint_effect / --sighup_effect=stop: SolverAction::STOP).
- `StopVote`: with several processes, a stop request on any of them must stop all of them after
  the same iteration (each would otherwise wait for the others in the next step's gradient
  reduction). After each step every process contributes one flag per local device to a tiny
  jitted any(); the result is read back with that step's loss.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class StopRequest:
    """While active, SIGINT/SIGTERM call `request(signal name)`: the Solver snapshots, then
    stops (Caffe's --sigint_effect; Solve snapshots after an early exit because
    snapshot_after_train defaults to true). Handlers exist only in the main thread."""

    def __init__(self, request: Callable[[str], None]) -> None:
        self.request = request
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StopVote:
    """any() over every process's stop flag, as a collective over the training devices."""

    def __init__(self, devices: Sequence[jax.Device], processes: int) -> None:
        mesh = Mesh(np.array(devices), ("data",))
        self.n_devices, self.n_local = len(devices), len(devices) // processes
        self.per_device = NamedSharding(mesh, PartitionSpec("data"))
        self.any_fn = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, stop: bool) -> jax.Array:
        """Dispatches the vote (every process calls it once per step); a replicated bool."""
        flags = np.full(self.n_local, stop)
        return self.any_fn(jax.make_array_from_process_local_data(
            self.per_device, flags, (self.n_devices,)))
