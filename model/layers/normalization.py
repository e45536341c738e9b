"""BatchNorm and the affine layers that follow it in Caffe nets: Scale, Bias.

Caffe's BatchNorm has no learnable scale/shift (prototxts add a Scale layer with
bias_term: true); its three blobs are statistics stored the way Caffe stores them:
  blob 0 = running SUM of means, blob 1 = running SUM of unbiased variances,
  blob 2 = (1,) the running sum of moving-average weights ("scale factor").
The estimate used at test time is blob / blob2 (0 when blob2 == 0).

Contract with the Net (model/net.py):
* The three blobs are declared with learnable=False (they are filled with zeros). Caffe itself
  keeps them in net.learnable_params with lr_mult forced to 0 (batch_norm_layer.cpp adds
  `param { lr_mult: 0 }` and rejects a non-zero lr_mult), so they appear in .caffemodel files
  and in the solverstate history in that order; the Net must keep that order for file
  compatibility. Their gradient here is zero (stop_gradient).
* use_global_stats: the prototxt value if given; else Caffe's default `phase == TEST`, taken
  from `param.phase` when the Net has set it, otherwise from `not train` at forward time.
* When batch statistics are used, `updated_blobs(blobs, bottoms, train=...)` returns the new
  values of the three blobs (Caffe updates them in every such forward):
    blob2 = blob2 * maf + 1
    blob0 = blob0 * maf + mean
    blob1 = blob1 * maf + m/(m-1) * biased_var      (m = count / channels; factor 1 if m == 1)
  With global statistics it returns None.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data.proto import caffe_pb2
from model.layers.base import BlobSpec, Layer, register
from model.layers.shapes import broadcast_shape, canonical_axis, count
from model.layers.vision import constant_filler


# Caffe: src/caffe/layers/batch_norm_layer.cpp.
@register
class BatchNorm(Layer):
    """y = (x - mean) / sqrt(var + eps) per channel (axis 1), batch or stored statistics."""

    type_name = "BatchNorm"

    def setup(self) -> None:
        bp = self.param.batch_norm_param
        if len(self.bottom_shapes) != 1:
            raise self.fail(f"takes 1 bottom, got {len(self.bottom_shapes)}")
        shape = self.bottom_shapes[0]
        if not shape:
            raise self.fail("bottom must have at least 1 axis")
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.eps = np.float32(bp.eps)
        self.maf = np.float32(bp.moving_average_fraction)
        for i, ps in enumerate(self.param.param[:3]):
            if ps.lr_mult != 0:
                raise self.fail(
                    f"param {i} has lr_mult {ps.lr_mult}: cannot configure batch normalization "
                    "statistics as layer parameters (lr_mult must be 0)"
                )
        if bp.HasField("use_global_stats"):
            self.global_stats: bool | None = bool(bp.use_global_stats)
        elif self.param.HasField("phase"):
            self.global_stats = self.param.phase == caffe_pb2.TEST
        else:
            self.global_stats = None  # decided by `train` at forward time
        m = count(shape) // self.channels
        self.bias_correction = np.float32(m / (m - 1)) if m > 1 else np.float32(1.0)
        # Reduce over every axis but the channels (axis 1).
        self.reduce_axes = tuple(i for i in range(len(shape)) if i != 1)
        self.bshape = broadcast_shape((self.channels,), len(shape), 1) if len(shape) > 1 else (1,)
        self.top_shapes = [shape]
        self.blobs = [
            BlobSpec((self.channels,), None, learnable=False),
            BlobSpec((self.channels,), None, learnable=False),
            BlobSpec((1,), None, learnable=False),
        ]

    def uses_global_stats(self, train: bool) -> bool:
        return (not train) if self.global_stats is None else self.global_stats

    def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = jnp.mean(x, axis=self.reduce_axes)
        centred = x - mean.reshape(self.bshape)
        var = jnp.mean(centred * centred, axis=self.reduce_axes)  # biased, as Caffe normalises
        return mean, var

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        if self.uses_global_stats(train):
            stored = [jax.lax.stop_gradient(b) for b in blobs]
            factor = jnp.where(stored[2][0] == 0, 0.0, 1.0 / stored[2][0])
            mean, var = stored[0] * factor, stored[1] * factor
        else:
            mean, var = self._batch_stats(x)
        std = jnp.sqrt(var + self.eps)
        return [(x - mean.reshape(self.bshape)) / std.reshape(self.bshape)]

    def updated_blobs(self, blobs, bottoms, *, train):
        if self.uses_global_stats(train):
            return None
        mean, var = self._batch_stats(jax.lax.stop_gradient(bottoms[0]))
        old = [jax.lax.stop_gradient(b) for b in blobs]
        return [
            old[0] * self.maf + mean,
            old[1] * self.maf + self.bias_correction * var,
            old[2] * self.maf + 1.0,
        ]


class _Affine(Layer):
    """Shared shape logic of Scale and Bias (scale_layer.cpp / bias_layer.cpp): the operand is a
    learned blob covering bottom axes [axis, axis+num_axes), or a second bottom."""

    def _operand_setup(self, axis_param: int, num_axes: int, filler: caffe_pb2.FillerParameter) -> None:
        if not 1 <= len(self.bottom_shapes) <= 2:
            raise self.fail(f"takes 1 or 2 bottoms, got {len(self.bottom_shapes)}")
        shape = self.bottom_shapes[0]
        self.top_shapes = [shape]
        if len(self.bottom_shapes) == 2:
            other = self.bottom_shapes[1]
            # A scalar second bottom applies to everything (axis forced to 0).
            if len(other) == 0:
                self.axis = 0
            else:
                self.axis = self._canon(axis_param, len(shape))
            if tuple(shape[self.axis : self.axis + len(other)]) != tuple(other):
                raise self.fail(
                    f"second bottom shape {other} must match bottom 0 {shape} "
                    f"from axis {self.axis}"
                )
            self.operand_shape = tuple(other)
            self.from_bottom = True
            return
        if num_axes < -1:
            raise self.fail(f"num_axes must be non-negative, or -1 for all, got {num_axes}")
        self.axis = self._canon(axis_param, len(shape)) if shape else 0
        end = len(shape) if num_axes == -1 else self.axis + num_axes
        if end > len(shape):
            raise self.fail(f"axis {self.axis} + num_axes {num_axes} exceeds bottom axes {len(shape)}")
        self.operand_shape = tuple(shape[self.axis : end])
        self.from_bottom = False
        self.blobs = [BlobSpec(self.operand_shape, filler)]

    def _canon(self, axis: int, ndim: int) -> int:
        try:
            return canonical_axis(axis, ndim)
        except ValueError as e:
            raise self.fail(str(e)) from None

    def _broadcast(self, operand: jax.Array) -> jax.Array:
        return operand.reshape(broadcast_shape(self.operand_shape, len(self.top_shapes[0]), self.axis))


# Caffe: src/caffe/layers/scale_layer.cpp.
@register
class Scale(_Affine):
    """y = x * scale (+ bias), the scale a learned blob (filler default constant 1) or bottom 1."""

    type_name = "Scale"

    def setup(self) -> None:
        sp = self.param.scale_param
        filler = sp.filler if sp.HasField("filler") else constant_filler(1.0)
        self._operand_setup(sp.axis, sp.num_axes, filler)
        self.bias_term = bool(sp.bias_term)
        if self.bias_term:
            bias_filler = sp.bias_filler if sp.HasField("bias_filler") else constant_filler(0.0)
            self.blobs.append(BlobSpec(self.operand_shape, bias_filler))

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        scale = bottoms[1] if self.from_bottom else blobs[0]
        y = x * self._broadcast(scale)
        if self.bias_term:
            y = y + self._broadcast(blobs[-1])
        return [y]


# Caffe: src/caffe/layers/bias_layer.cpp.
@register
class Bias(_Affine):
    """y = x + bias, the bias a learned blob (filler default constant 0) or bottom 1."""

    type_name = "Bias"

    def setup(self) -> None:
        bp = self.param.bias_param
        filler = bp.filler if bp.HasField("filler") else constant_filler(0.0)
        self._operand_setup(bp.axis, bp.num_axes, filler)

    def forward(self, blobs, bottoms, *, rng, train):
        bias = bottoms[1] if self.from_bottom else blobs[0]
        return [bottoms[0] + self._broadcast(bias)]


__all__ = ["BatchNorm", "Scale", "Bias"]
