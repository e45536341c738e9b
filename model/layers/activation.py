"""Elementwise activations: ReLU (with negative_slope), Sigmoid, TanH.

Written with `jnp.where` on the same comparison Caffe uses so that the gradient at the kink
matches Caffe exactly (jnp.maximum would give 1/2 at x == 0).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model.layers.base import Layer, register


class _Elementwise(Layer):
    def setup(self) -> None:
        if len(self.bottom_shapes) != 1:
            raise self.fail(f"takes 1 bottom, got {len(self.bottom_shapes)}")
        self.top_shapes = [self.bottom_shapes[0]]


# Caffe: src/caffe/layers/relu_layer.cpp.
@register
class ReLU(_Elementwise):
    """y = max(x, 0) + negative_slope * min(x, 0); dy/dx = 1 if x > 0 else negative_slope
    (Caffe's Backward uses `x > 0`, so the gradient at 0 is negative_slope)."""

    type_name = "ReLU"

    def setup(self) -> None:
        super().setup()
        self.slope = np.float32(self.param.relu_param.negative_slope)

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        if self.slope == 0:
            return [jnp.where(x > 0, x, jnp.zeros((), x.dtype))]
        return [jnp.where(x > 0, x, x * self.slope)]


# Caffe: src/caffe/layers/sigmoid_layer.cpp (master computes 0.5 * tanh(0.5 x) + 0.5).
@register
class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)), computed as Caffe does via tanh."""

    type_name = "Sigmoid"

    def forward(self, blobs, bottoms, *, rng, train):
        return [0.5 * jnp.tanh(0.5 * bottoms[0]) + 0.5]


# Caffe: src/caffe/layers/tanh_layer.cpp.
@register
class TanH(_Elementwise):
    """y = tanh(x)."""

    type_name = "TanH"

    def forward(self, blobs, bottoms, *, rng, train):
        return [jnp.tanh(bottoms[0])]


__all__ = ["ReLU", "Sigmoid", "TanH"]
