"""Weight fillers: Caffe's FillerParameter types (include/caffe/filler.hpp) as pure functions.

`fill(filler_param, shape, rng)` returns a float32 jax array of `shape`. The distributions are
Caffe's; the random stream is numpy's PCG64 seeded from the JAX key (Caffe's Mersenne-Twister
draws cannot be reproduced anyway), so an initialised net matches Caffe in distribution, not bit
for bit, and the same key always gives the same blob. numpy rather than jax.random because
eager jax.random compiles one XLA program per blob shape: initialising AlexNet took ~60 s of
compilation on the 2-core machine against ~2 s of numpy sampling.

Caffe's fan definitions (filler.hpp, XavierFiller/MSRAFiller): fan_in = count / shape[0],
fan_out = count / shape[1] (count when the blob has one axis); variance_norm picks fan_in,
fan_out or their average.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.errors import ImagenetError
from data.proto import caffe_pb2

Shape = tuple[int, ...]
FillFn = Callable[[caffe_pb2.FillerParameter, Shape, np.random.Generator], np.ndarray]

DTYPE = np.float32
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
def constant(param: caffe_pb2.FillerParameter, shape: Shape,
             gen: np.random.Generator) -> np.ndarray:
    return np.full(shape, param.value, DTYPE)


@_register("uniform")
def uniform(param: caffe_pb2.FillerParameter, shape: Shape,
            gen: np.random.Generator) -> np.ndarray:
    if param.max < param.min:
        raise ImagenetError(f"uniform filler: max {param.max} < min {param.min}")
    return _uniform(gen, shape, param.min, param.max)


@_register("gaussian")
def gaussian(param: caffe_pb2.FillerParameter, shape: Shape,
             gen: np.random.Generator) -> np.ndarray:
    x = _normal(gen, shape, param.mean, param.std)
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
        x = x * (gen.random(shape, dtype=DTYPE) < p).astype(DTYPE)
    return x


@_register("positive_unitball")
def positive_unitball(param: caffe_pb2.FillerParameter, shape: Shape,
                      gen: np.random.Generator) -> np.ndarray:
    # PositiveUnitballFiller: uniform(0, 1), then each of the shape[0] rows sums to one.
    rows = _uniform(gen, shape, 0.0, 1.0).reshape(shape[0], -1)
    return (rows / np.sum(rows, axis=1, keepdims=True)).reshape(shape).astype(DTYPE)


@_register("xavier")
def xavier(param: caffe_pb2.FillerParameter, shape: Shape,
           gen: np.random.Generator) -> np.ndarray:
    scale = math.sqrt(XAVIER_NUMERATOR / _variance_n(param, shape))
    return _uniform(gen, shape, -scale, scale)


@_register("msra")
def msra(param: caffe_pb2.FillerParameter, shape: Shape,
         gen: np.random.Generator) -> np.ndarray:
    std = math.sqrt(MSRA_NUMERATOR / _variance_n(param, shape))
    return _normal(gen, shape, 0.0, std)


@_register("bilinear")
def bilinear(param: caffe_pb2.FillerParameter, shape: Shape,
             gen: np.random.Generator) -> np.ndarray:
    # BilinearFiller: upsampling kernels for Deconvolution; 4-D, square kernels only.
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ImagenetError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
    width = shape[3]
    f = math.ceil(width / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1.0 - np.abs(np.arange(width, dtype=np.float64) / f - c)
    kernel = ramp[:, None] * ramp[None, :]
    return np.broadcast_to(kernel, shape).astype(DTYPE)


def _uniform(gen: np.random.Generator, shape: Shape, lo: float, hi: float) -> np.ndarray:
    return (lo + (hi - lo) * gen.random(shape, dtype=DTYPE)).astype(DTYPE)


def _normal(gen: np.random.Generator, shape: Shape, mean: float, std: float) -> np.ndarray:
    return (mean + std * gen.standard_normal(shape, dtype=DTYPE)).astype(DTYPE)


def generator(rng: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key (raw uint32 key or typed key)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng([int(v) for v in np.asarray(rng).ravel()])


def fill(filler_param: caffe_pb2.FillerParameter | None, shape: Sequence[int],
         rng: jax.Array) -> jax.Array:
    """A blob of `shape` filled as `filler_param` says (None: zeros, Caffe's default
    FillerParameter is constant 0). `rng` is a JAX key; equal keys give equal blobs."""
    shape = tuple(int(d) for d in shape)
    if filler_param is None:
        return jnp.zeros(shape, jnp.float32)
    try:
        fn = FILLERS[filler_param.type]
    except KeyError:
        raise ImagenetError(f"unknown filler type {filler_param.type!r}; "
                            f"valid: {', '.join(sorted(FILLERS))}") from None
    return jnp.asarray(fn(filler_param, shape, generator(rng)))


__all__ = ["FILLERS", "fans", "fill", "generator"]
