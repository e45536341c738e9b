"""Per-backend choices of the compiled computations: which kernels a traced net uses and which
XLA options its train step is compiled with.

The hand-written kernels of model/kernels.py (im2col / Winograd convolutions with measured
plans, model/autotune.py; first-max pooling indices) exist because XLA:CPU's convolution
gradients and select_and_scatter are slow; on a GPU XLA's own convolutions (cuDNN) are the
right choice and the CPU plans must not be measured or used there. The choice follows the
devices a computation is compiled for, not `jax.default_backend()`: `--gpu=-1` on a GPU host
trains on the CPU and must get the CPU kernels. `traced_for(fn, platform)` makes `fn` trace with
that platform as the answer of `platform()`; outside of it `platform()` is the default backend.
"""
from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable

import jax

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("imagenet_platform",
                                                                      default=None)

# XLA options of the jitted train step, per platform (jax.jit's compiler_options). XLA:CPU:
# region analysis in copy insertion; without it XLA:CPU copied every donated weight blob before
# the update wrote it in place (bvlc_alexnet: 243 MB per step, 10-20 ms of a 905-935 ms step on
# the 2-core Zen 4; benchmarks/README.md). The option does not exist for other backends.
TRAIN_STEP_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_copy_insertion_use_region_analysis": True},
}


def platform() -> str:
    """The platform being traced for ("cpu", "gpu", "tpu")."""
    return _PLATFORM.get() or jax.default_backend()


def uses_cpu_kernels() -> bool:
    """Whether convolutions and max pooling take model/kernels.py's CPU kernels."""
    return platform() == "cpu"


def train_step_options(platform_name: str) -> dict[str, Any]:
    return dict(TRAIN_STEP_OPTIONS.get(platform_name, {}))


def traced_for(fn: Callable, platform_name: str) -> Callable:
    """`fn`, which jax.jit will trace, tracing with `platform()` == platform_name."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = _PLATFORM.set(platform_name)
        try:
            return fn(*args, **kwargs)
        finally:
            _PLATFORM.reset(token)
    return wrapped
