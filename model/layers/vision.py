"""Spatial layers: Convolution, Pooling, LRN (NCHW in and out, Caffe's arithmetic).

The compute lives in small module-level functions (`conv2d`, `max_pool2d`, `ave_pool2d`,
`lrn_across_channels`, `lrn_within_channel`) so that a faster kernel can be swapped in with a
one-line change; the layer classes only parse parameters, check shapes and call them.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from data.proto import caffe_pb2
from model import backend, kernels
from model.layers.base import BlobSpec, Layer, Shape, register

# Full float32 accuracy on every backend (TF32 on GPUs would break "match Caffe within float32
# rounding"); on CPU this is what XLA does anyway.
CONV_PRECISION = lax.Precision.HIGHEST
_NCHW = ("NCHW", "OIHW", "NCHW")

Pair = tuple[int, int]


# -- compute kernels ------------------------------------------------------------------------
def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    stride: Pair,
    pad: Pair,
    dilation: Pair,
    groups: int,
) -> jax.Array:
    """Caffe's convolution (cross-correlation, symmetric zero padding), NCHW / OIHW.

    Grouped convolutions run as one convolution per group + concat: bit-identical to
    feature_group_count and several times faster on XLA CPU (MACHINE_NOTES.md).
    On CPU the GEMM kernel of model/kernels.py replaces XLA's slow weight gradients (the
    platform being traced for: model/backend.py); elsewhere XLA's own convolution.
    """
    if backend.uses_cpu_kernels():
        return kernels.conv2d(x, w, b, stride, pad, dilation, groups)
    padding = [(pad[0], pad[0]), (pad[1], pad[1])]

    def one(xg: jax.Array, wg: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            xg, wg, window_strides=stride, padding=padding, rhs_dilation=dilation,
            dimension_numbers=_NCHW, precision=CONV_PRECISION,
        )

    if groups == 1:
        y = one(x, w)
    else:
        xs = jnp.split(x, groups, axis=1)
        ws = jnp.split(w, groups, axis=0)
        y = jnp.concatenate([one(xg, wg) for xg, wg in zip(xs, ws)], axis=1)
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def _window_padding(size: int, out: int, kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """(low, high) padding so that `out` windows of `kernel` at `stride` starting at -pad fit;
    high may exceed pad (Caffe's ceil mode lets the last window run past the padding)."""
    return pad, (out - 1) * stride + kernel - size - pad


def _crop_for_negative_padding(x: jax.Array, pads: Sequence[tuple[int, int]]):
    """reduce_window wants non-negative padding: crop the unused tail rows/cols instead."""
    hi_h, hi_w = pads[0][1], pads[1][1]
    if hi_h < 0:
        x = x[:, :, : x.shape[2] + hi_h, :]
    if hi_w < 0:
        x = x[:, :, :, : x.shape[3] + hi_w]
    return x, [(lo, max(hi, 0)) for lo, hi in pads]


def max_pool2d(
    x: jax.Array, kernel: Pair, stride: Pair, pads: Sequence[tuple[int, int]]
) -> jax.Array:
    """Max over each window; padded positions never win (Caffe clips windows to the image).

    Gradient: JAX differentiates reduce_window max through select_and_scatter with a `>=`
    select, which keeps the FIRST maximum of a window in row-major (h, then w) order: the same
    element Caffe's `bottom > top` scan picks (pooling_layer.cpp), so ties route the gradient
    identically (tests/model/test_layers_vision.py checks it on tied inputs).
    On CPU model/kernels.py's first-max index kernel replaces select_and_scatter (same routing).
    """
    if backend.uses_cpu_kernels():
        return kernels.max_pool2d_windows(x, kernel, stride, pads)
    x, pads = _crop_for_negative_padding(x, pads)
    return lax.reduce_window(
        x, np.array(-np.inf, x.dtype), lax.max, (1, 1) + tuple(kernel), (1, 1) + tuple(stride),
        ((0, 0), (0, 0)) + tuple(pads),
    )


def ave_pool2d(
    x: jax.Array,
    kernel: Pair,
    stride: Pair,
    pads: Sequence[tuple[int, int]],
    divisor: np.ndarray,
) -> jax.Array:
    """Window sums of the real pixels divided by Caffe's per-window `divisor` (out_h, out_w)."""
    x, pads = _crop_for_negative_padding(x, pads)
    s = lax.reduce_window(
        x, np.zeros((), x.dtype), lax.add, (1, 1) + tuple(kernel), (1, 1) + tuple(stride),
        ((0, 0), (0, 0)) + tuple(pads),
    )
    return s / jnp.asarray(divisor, x.dtype)


def caffe_ave_divisor(size: Pair, out: Pair, kernel: Pair, stride: Pair, pad: Pair) -> np.ndarray:
    """Caffe's AVE pool_size per output window: the window clipped to [-pad, H + pad), so padded
    positions inside H + pad count but a window running past the padding does not."""

    def axis(n: int, o: int, k: int, s: int, p: int) -> np.ndarray:
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        return (end - start).astype(np.float64)

    dh = axis(size[0], out[0], kernel[0], stride[0], pad[0])
    dw = axis(size[1], out[1], kernel[1], stride[1], pad[1])
    return np.outer(dh, dw).astype(np.float32)


def _pow_neg_beta(scale: jax.Array, beta: float) -> jax.Array:
    """scale^-beta; for AlexNet's beta 0.75 as t * sqrt(t) with t = rsqrt(s), which XLA CPU
    computes much faster than pow (MACHINE_NOTES.md) and within float32 rounding of it (3e-7
    relative at most over s in [1, 101]). Forward + backward of bvlc_alexnet's norm1 at batch
    32 on the 2-core Zen 4: 21.5 ms, against 34.9 for rsqrt(s) * rsqrt(sqrt(s)), whose second
    rsqrt XLA ran as a pass of its own, and 57.0 for pow (norm2: 18.4, 30.9, 36.4)."""
    if beta == 0.75:
        t = lax.rsqrt(scale)
        return t * jnp.sqrt(t)
    if beta == 0.5:
        return lax.rsqrt(scale)
    return scale ** (-beta)


def lrn_across_channels(x: jax.Array, size: int, alpha: float, beta: float, k: float) -> jax.Array:
    """scale = k + alpha/n * sum of x^2 over a zero-padded window of n channels centred on c,
    y = x * scale^-beta (lrn_layer.cpp CrossChannelForward_cpu)."""
    pre = (size - 1) // 2
    sq = x * x
    window_sum = lax.reduce_window(
        sq, np.zeros((), x.dtype), lax.add, (1, size, 1, 1), (1, 1, 1, 1),
        ((0, 0), (pre, size - 1 - pre), (0, 0), (0, 0)),
    )
    # Caffe computes alpha_over_size in the blob's precision.
    alpha_over_size = np.float32(alpha) / np.float32(size)
    scale = np.float32(k) + alpha_over_size * window_sum
    # numpy float32 constants are not weakly typed: keep a bfloat16 blob bfloat16.
    return (x * _pow_neg_beta(scale, beta)).astype(x.dtype)


def lrn_within_channel(x: jax.Array, size: int, alpha: float, beta: float) -> jax.Array:
    """Caffe's WITHIN_CHANNEL LRN is built from layers (lrn_layer.cpp LayerSetUp): AVE pooling of
    x^2 (kernel n, pad (n-1)/2, stride 1: every divisor is n*n), then Power(shift 1, scale
    alpha, power -beta), then a product with x. Note: `k` is NOT used in this mode."""
    pre = (size - 1) // 2
    h, w = x.shape[2], x.shape[3]
    divisor = caffe_ave_divisor((h, w), (h, w), (size, size), (1, 1), (pre, pre))
    pooled = ave_pool2d(x * x, (size, size), (1, 1), [(pre, pre), (pre, pre)], divisor)
    return (x * _pow_neg_beta(1.0 + np.float32(alpha) * pooled, beta)).astype(x.dtype)


# -- parameter parsing ----------------------------------------------------------------------
def _spatial(
    layer: Layer, name: str, values: Sequence[int], h: int | None, w: int | None, default: int
) -> Pair:
    """Caffe's repeated-or-_h/_w spatial parameter (base_conv_layer.cpp LayerSetUp)."""
    if h is not None or w is not None:
        if values:
            raise layer.fail(f"give either {name} or {name}_h/{name}_w, not both")
        if h is None or w is None:
            raise layer.fail(f"{name}_h and {name}_w must both be given (got {h}, {w})")
        return int(h), int(w)
    vals = list(values)
    if not vals:
        return default, default
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise layer.fail(f"{name} has {len(vals)} values; 2-D layers take 1 or 2")


def _opt(msg, field: str) -> int | None:
    return getattr(msg, field) if msg.HasField(field) else None


def _filler_or(msg, field: str, default: caffe_pb2.FillerParameter) -> caffe_pb2.FillerParameter:
    """The prototxt's filler if given, else Caffe's default for that blob."""
    if msg.HasField(field):
        return getattr(msg, field)
    return default


def constant_filler(value: float = 0.0) -> caffe_pb2.FillerParameter:
    """A constant FillerParameter (Caffe's default filler is constant 0)."""
    return caffe_pb2.FillerParameter(type="constant", value=value)


# -- layers ---------------------------------------------------------------------------------
# Caffe: src/caffe/layers/base_conv_layer.cpp + conv_layer.cpp.
@register
class Convolution(Layer):
    """2-D convolution with groups, dilation, stride, padding and an optional bias."""

    type_name = "Convolution"

    def setup(self) -> None:
        cp = self.param.convolution_param
        if len(self.bottom_shapes) != 1:
            raise self.fail(f"takes 1 bottom, got {len(self.bottom_shapes)}")
        shape = self.bottom_shapes[0]
        if cp.axis not in (1, -3) or len(shape) != 4:
            raise self.fail(f"only 2-D convolution over NCHW is supported (bottom {shape}, axis {cp.axis})")
        n, c, h, w = shape
        if cp.num_output <= 0:
            raise self.fail(f"num_output must be positive, got {cp.num_output}")
        self.kernel = _spatial(self, "kernel", cp.kernel_size, _opt(cp, "kernel_h"), _opt(cp, "kernel_w"), 0)
        self.stride = _spatial(self, "stride", cp.stride, _opt(cp, "stride_h"), _opt(cp, "stride_w"), 1)
        self.pad = _spatial(self, "pad", cp.pad, _opt(cp, "pad_h"), _opt(cp, "pad_w"), 0)
        self.dilation = _spatial(self, "dilation", cp.dilation, None, None, 1)
        if min(self.kernel) <= 0:
            raise self.fail(f"kernel size must be positive, got {self.kernel}")
        if min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise self.fail(f"stride {self.stride} and dilation {self.dilation} must be positive")
        self.group = int(cp.group)
        if self.group <= 0 or c % self.group or cp.num_output % self.group:
            raise self.fail(
                f"group {self.group} must divide both the input channels ({c}) "
                f"and num_output ({cp.num_output})"
            )
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.pad, self.dilation):
            extent = d * (k - 1) + 1
            if size + 2 * p < extent:
                raise self.fail(f"kernel extent {extent} larger than padded input {size}+2*{p}")
            out.append((size + 2 * p - extent) // s + 1)
        self.top_shapes = [(n, int(cp.num_output), out[0], out[1])]
        self.bias_term = bool(cp.bias_term)
        self.blobs = [
            BlobSpec(
                (int(cp.num_output), c // self.group) + self.kernel,
                _filler_or(cp, "weight_filler", constant_filler()),
            )
        ]
        if self.bias_term:
            self.blobs.append(
                BlobSpec((int(cp.num_output),), _filler_or(cp, "bias_filler", constant_filler()))
            )

    def forward(self, blobs, bottoms, *, rng, train):
        b = blobs[1] if self.bias_term else None
        return [conv2d(bottoms[0], blobs[0], b, self.stride, self.pad, self.dilation, self.group)]


_POOL_METHODS = {
    caffe_pb2.PoolingParameter.MAX: "MAX",
    caffe_pb2.PoolingParameter.AVE: "AVE",
}


# Caffe: src/caffe/layers/pooling_layer.cpp.
@register
class Pooling(Layer):
    """MAX / AVE pooling with Caffe's output size (ceil, or floor with round_mode FLOOR)."""

    type_name = "Pooling"

    def setup(self) -> None:
        pp = self.param.pooling_param
        if len(self.bottom_shapes) != 1:
            raise self.fail(f"takes 1 bottom, got {len(self.bottom_shapes)}")
        if len(self.param.top) != 1:
            raise self.fail(f"only one top is supported (the max-index mask top is not), got {list(self.param.top)}")
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise self.fail(f"bottom must be 4-D (N, C, H, W), got {shape}")
        if pp.pool not in _POOL_METHODS:
            name = caffe_pb2.PoolingParameter.PoolMethod.Name(pp.pool)
            raise self.fail(f"pool {name} is not supported; supported: {', '.join(_POOL_METHODS.values())}")
        self.method = _POOL_METHODS[pp.pool]
        n, c, h, w = shape
        has_kernel = pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w")
        if pp.global_pooling:
            if has_kernel:
                raise self.fail("with global_pooling: true the kernel size cannot be specified")
            self.kernel = (h, w)
        else:
            if pp.HasField("kernel_size") == (pp.HasField("kernel_h") or pp.HasField("kernel_w")):
                raise self.fail("give kernel_size OR kernel_h and kernel_w (exactly one form)")
            if pp.HasField("kernel_size"):
                self.kernel = (pp.kernel_size, pp.kernel_size)
            elif pp.HasField("kernel_h") and pp.HasField("kernel_w"):
                self.kernel = (pp.kernel_h, pp.kernel_w)
            else:
                raise self.fail("for non-square filters both kernel_h and kernel_w are required")
        if pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w")):
            raise self.fail("give pad OR pad_h and pad_w")
        if pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w")):
            raise self.fail("give stride OR stride_h and stride_w")
        if pp.HasField("pad_h") or pp.HasField("pad_w"):
            if not (pp.HasField("pad_h") and pp.HasField("pad_w")):
                raise self.fail("pad_h and pad_w must both be given")
            self.pad = (pp.pad_h, pp.pad_w)
        else:
            self.pad = (pp.pad, pp.pad)
        if pp.HasField("stride_h") or pp.HasField("stride_w"):
            if not (pp.HasField("stride_h") and pp.HasField("stride_w")):
                raise self.fail("stride_h and stride_w must both be given")
            self.stride = (pp.stride_h, pp.stride_w)
        else:
            self.stride = (pp.stride, pp.stride)
        if min(self.kernel) <= 0 or min(self.stride) <= 0:
            raise self.fail(f"kernel {self.kernel} and stride {self.stride} must be positive")
        if pp.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.fail(f"with global_pooling: true only pad 0 and stride 1 (got pad {self.pad}, stride {self.stride})")
        if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
            raise self.fail(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        out = []
        rnd = math.floor if pp.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
        for size, k, s, p in zip((h, w), self.kernel, self.stride, self.pad):
            if size + 2 * p < k:
                raise self.fail(f"kernel {k} larger than padded input {size}+2*{p}")
            # Caffe computes the division in float.
            o = int(rnd(float(np.float32(size + 2 * p - k) / np.float32(s)))) + 1
            # "ensure that the last pooling starts strictly inside the image"
            if p and (o - 1) * s >= size + p:
                o -= 1
            out.append(o)
        self.out = (out[0], out[1])
        self.top_shapes = [(n, c, out[0], out[1])]
        self.pads = [
            _window_padding(size, o, k, s, p)
            for size, o, k, s, p in zip((h, w), self.out, self.kernel, self.stride, self.pad)
        ]
        if self.method == "AVE":
            self.divisor = caffe_ave_divisor((h, w), self.out, self.kernel, self.stride, self.pad)

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        if self.method == "MAX":
            return [max_pool2d(x, self.kernel, self.stride, self.pads)]
        return [ave_pool2d(x, self.kernel, self.stride, self.pads, self.divisor)]


# Caffe: src/caffe/layers/lrn_layer.cpp.
@register
class LRN(Layer):
    """Local response normalisation, ACROSS_CHANNELS (AlexNet) or WITHIN_CHANNEL."""

    type_name = "LRN"

    def setup(self) -> None:
        lp = self.param.lrn_param
        if len(self.bottom_shapes) != 1:
            raise self.fail(f"takes 1 bottom, got {len(self.bottom_shapes)}")
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise self.fail(f"input must have 4 axes (num, channels, height, width), got {shape}")
        if lp.local_size % 2 != 1:
            raise self.fail(f"LRN only supports odd values for local_size, got {lp.local_size}")
        self.size = int(lp.local_size)
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        regions = caffe_pb2.LRNParameter.NormRegion
        if lp.norm_region not in (caffe_pb2.LRNParameter.ACROSS_CHANNELS, caffe_pb2.LRNParameter.WITHIN_CHANNEL):
            raise self.fail(f"unknown norm_region {lp.norm_region}; supported: {', '.join(regions.keys())}")
        self.within = lp.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
        self.top_shapes = [shape]

    def forward(self, blobs, bottoms, *, rng, train):
        if self.within:
            return [lrn_within_channel(bottoms[0], self.size, self.alpha, self.beta)]
        return [lrn_across_channels(bottoms[0], self.size, self.alpha, self.beta, self.k)]


__all__ = [
    "Convolution", "Pooling", "LRN", "conv2d", "max_pool2d", "ave_pool2d", "caffe_ave_divisor",
    "lrn_across_channels", "lrn_within_channel", "constant_filler",
]
