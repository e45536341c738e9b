"""Small shape helpers shared by the layer modules: Caffe's axis and count conventions.

Reproduces Blob::CanonicalAxisIndex and Blob::count(start, end) (include/caffe/blob.hpp), so
that every layer interprets `axis: -1` and friends exactly as Caffe does.
"""
from __future__ import annotations

from math import prod
from typing import Sequence

from model.layers.base import Shape


def canonical_axis(axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: -num_axes <= axis < num_axes, negatives count from the end.

    Raises ValueError with the offending values; layers turn it into their own error.
    """
    if not -num_axes <= axis < num_axes:
        raise ValueError(f"{what} {axis} out of range for a {num_axes}-axis blob")
    return axis + num_axes if axis < 0 else axis


def count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Product of shape[start:end] (1 for an empty range), Blob::count(start, end)."""
    return int(prod(shape[start:end]))


def broadcast_shape(param_shape: Shape, ndim: int, axis: int) -> Shape:
    """The shape that broadcasts a blob covering axes [axis, axis+len(param_shape)) of an
    ndim-axis bottom (Scale, Bias, BatchNorm's per-channel statistics)."""
    return (1,) * axis + tuple(param_shape) + (1,) * (ndim - axis - len(param_shape))


__all__ = ["canonical_axis", "count", "broadcast_shape"]
