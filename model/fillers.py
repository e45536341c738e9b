"""Weight fillers: Caffe's FillerParameter types (include/caffe/filler.hpp) as pure functions.

`fill(filler_param, shape, rng)` returns a float32 jax array of `shape`. The distributions are
Caffe's; the random streams are JAX's (Caffe's Mersenne-Twister draws cannot be reproduced), so
an initialised net matches Caffe in distribution, not bit for bit.

Caffe's fan definitions (filler.hpp, XavierFiller/MSRAFiller): fan_in = count / shape[0],
fan_out = count / shape[1] (count when the blob has one axis); variance_norm picks fan_in,
fan_out or their average.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from data.errors import ImagenetError
from data.proto import caffe_pb2

Shape = tuple[int, ...]
FillFn = Callable[[caffe_pb2.FillerParameter, Shape, jax.Array], jax.Array]

DTYPE = jnp.float32
# XavierFiller: uniform(-sqrt(3/n), sqrt(3/n)) has variance 1/n.
XAVIER_NUMERATOR = 3.0
# MSRAFiller: gaussian with std sqrt(2/n) (He et al. for ReLU nets).
MSRA_NUMERATOR = 2.0
# GaussianFiller's `sparse` default -1 means dense.
DENSE = -1

FILLERS: dict[str, FillFn] = {}


def _register(name: str) -> Callable[[FillFn], FillFn]:
    def deco(fn: FillFn) -> FillFn:
        FILLERS[name] = fn
        return fn
    return deco


def _count(shape: Shape) -> int:
    return math.prod(shape)


def fans(shape: Shape) -> tuple[float, float]:
    """(fan_in, fan_out) as Caffe's filler.hpp computes them."""
    if not shape:
        raise ImagenetError("a filler needs a blob with at least one axis")
    count = _count(shape)
    fan_in = count / shape[0]
    fan_out = count / shape[1] if len(shape) > 1 else float(count)
    return fan_in, fan_out


def _variance_n(param: caffe_pb2.FillerParameter, shape: Shape) -> float:
    fan_in, fan_out = fans(shape)
    norm = param.variance_norm
    VN = caffe_pb2.FillerParameter
    if norm == VN.FAN_IN:
        return fan_in
    if norm == VN.FAN_OUT:
        return fan_out
    if norm == VN.AVERAGE:
        return (fan_in + fan_out) / 2.0
    raise ImagenetError(f"unknown variance_norm {norm}")


@_register("constant")
def constant(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    return jnp.full(shape, param.value, DTYPE)


@_register("uniform")
def uniform(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    if param.max < param.min:
        raise ImagenetError(f"uniform filler: max {param.max} < min {param.min}")
    return jax.random.uniform(rng, shape, DTYPE, param.min, param.max)


@_register("gaussian")
def gaussian(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    k_val, k_mask = jax.random.split(rng)
    x = param.mean + param.std * jax.random.normal(k_val, shape, DTYPE)
    if param.sparse != DENSE:
        # GaussianFiller: keep each weight with probability sparse / num_outputs (shape[0]).
        if param.sparse < 0:
            raise ImagenetError(f"gaussian filler: sparse must be >= 0, got {param.sparse}")
        if len(shape) < 1:
            raise ImagenetError("gaussian filler: sparse needs a blob with an output axis")
        p = param.sparse / shape[0]
        if p > 1:
            raise ImagenetError(f"gaussian filler: sparse {param.sparse} exceeds the number "
                                f"of outputs {shape[0]}")
        x = x * jax.random.bernoulli(k_mask, p, shape).astype(DTYPE)
    return x


@_register("positive_unitball")
def positive_unitball(param: caffe_pb2.FillerParameter, shape: Shape,
                      rng: jax.Array) -> jax.Array:
    # PositiveUnitballFiller: uniform(0, 1), then each of the shape[0] rows sums to one.
    x = jax.random.uniform(rng, shape, DTYPE)
    rows = x.reshape(shape[0], -1)
    return (rows / jnp.sum(rows, axis=1, keepdims=True)).reshape(shape)


@_register("xavier")
def xavier(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    scale = math.sqrt(XAVIER_NUMERATOR / _variance_n(param, shape))
    return jax.random.uniform(rng, shape, DTYPE, -scale, scale)


@_register("msra")
def msra(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    std = math.sqrt(MSRA_NUMERATOR / _variance_n(param, shape))
    return std * jax.random.normal(rng, shape, DTYPE)


@_register("bilinear")
def bilinear(param: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array) -> jax.Array:
    # BilinearFiller: upsampling kernels for Deconvolution; 4-D, square kernels only.
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ImagenetError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
    width = shape[3]
    f = math.ceil(width / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1.0 - jnp.abs(jnp.arange(width, dtype=DTYPE) / f - c)
    kernel = ramp[:, None] * ramp[None, :]
    return jnp.broadcast_to(kernel, shape).astype(DTYPE)


def fill(filler_param: caffe_pb2.FillerParameter | None, shape: Sequence[int],
         rng: jax.Array) -> jax.Array:
    """A blob of `shape` filled as `filler_param` says (None: zeros, Caffe's default
    FillerParameter is constant 0)."""
    shape = tuple(int(d) for d in shape)
    if filler_param is None:
        return jnp.zeros(shape, DTYPE)
    try:
        fn = FILLERS[filler_param.type]
    except KeyError:
        raise ImagenetError(f"unknown filler type {filler_param.type!r}; "
                            f"valid: {', '.join(sorted(FILLERS))}") from None
    return fn(filler_param, shape, rng)


__all__ = ["FILLERS", "fans", "fill"]
