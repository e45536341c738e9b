"""Shape-agnostic layers: InnerProduct, Dropout, Softmax, Concat, Flatten, Eltwise, Split, Reshape.

Each class names the Caffe source file whose arithmetic it reproduces.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from data.proto import caffe_pb2
from model import kernels
from model.layers.base import BlobSpec, Layer, Shape, register
from model.layers.shapes import canonical_axis, count
from model.layers.vision import _filler_or, constant_filler


def _axis(layer: Layer, axis: int, ndim: int, what: str = "axis") -> int:
    try:
        return canonical_axis(axis, ndim, what)
    except ValueError as e:
        raise layer.fail(str(e)) from None


def _one_bottom(layer: Layer) -> Shape:
    if len(layer.bottom_shapes) != 1:
        raise layer.fail(f"takes 1 bottom, got {len(layer.bottom_shapes)}")
    return layer.bottom_shapes[0]


# Caffe: src/caffe/layers/inner_product_layer.cpp.
@register
class InnerProduct(Layer):
    """y = x W^T + b over x flattened from `axis` on (C,H,W order); W (num_output, K), or
    (K, num_output) with transpose: true."""

    type_name = "InnerProduct"

    def setup(self) -> None:
        ip = self.param.inner_product_param
        shape = _one_bottom(self)
        if ip.num_output <= 0:
            raise self.fail(f"num_output must be positive, got {ip.num_output}")
        self.axis = _axis(self, ip.axis, len(shape))
        self.k = count(shape, self.axis)
        self.n = int(ip.num_output)
        self.transpose = bool(ip.transpose)
        self.bias_term = bool(ip.bias_term)
        self.top_shapes = [tuple(shape[: self.axis]) + (self.n,)]
        w_shape = (self.k, self.n) if self.transpose else (self.n, self.k)
        self.blobs = [BlobSpec(w_shape, _filler_or(ip, "weight_filler", constant_filler()))]
        if self.bias_term:
            self.blobs.append(BlobSpec((self.n,), _filler_or(ip, "bias_filler", constant_filler())))

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        lead = x.shape[: self.axis]
        x2 = x.reshape((count(lead), self.k))
        w = blobs[0]
        # kernels.matmul: full float32, or bf16 operands with float32 sums (--precision bf16).
        y = kernels.matmul(x2, w if self.transpose else w.T)
        if self.bias_term:
            y = y + blobs[1]
        return [y.reshape(tuple(lead) + (self.n,))]


# Caffe: src/caffe/layers/dropout_layer.cpp.
@register
class Dropout(Layer):
    """Inverted dropout: TRAIN keeps each unit with probability 1-p and scales it by 1/(1-p);
    TEST is the identity."""

    type_name = "Dropout"

    def setup(self) -> None:
        shape = _one_bottom(self)
        p = float(np.float32(self.param.dropout_param.dropout_ratio))
        if not 0.0 <= p < 1.0:
            raise self.fail(f"dropout_ratio must be in [0, 1), got {p}")
        self.ratio = p
        # dropout_layer.cpp: scale_ = 1. / (1. - threshold_), stored as the blob type (float).
        self.scale = np.float32(1.0 / (1.0 - np.float64(np.float32(p))))
        self.top_shapes = [shape]

    def forward(self, blobs, bottoms, *, rng, train):
        x = bottoms[0]
        if not train or self.ratio == 0.0:
            return [x]
        if rng is None:
            raise self.fail("a TRAIN forward needs an rng for the dropout mask")
        keep = jax.random.bernoulli(rng, 1.0 - self.ratio, x.shape)
        return [jnp.where(keep, x * self.scale, jnp.zeros((), x.dtype))]


# Caffe: src/caffe/layers/softmax_layer.cpp.
@register
class Softmax(Layer):
    """exp(x - max) / sum over `axis` (default 1, the channels)."""

    type_name = "Softmax"

    def setup(self) -> None:
        shape = _one_bottom(self)
        self.axis = _axis(self, self.param.softmax_param.axis, len(shape))
        self.top_shapes = [shape]

    def forward(self, blobs, bottoms, *, rng, train):
        return [jax.nn.softmax(bottoms[0], axis=self.axis)]


# Caffe: src/caffe/layers/concat_layer.cpp.
@register
class Concat(Layer):
    """Concatenate bottoms along `axis` (or the legacy `concat_dim`)."""

    type_name = "Concat"

    def setup(self) -> None:
        cp = self.param.concat_param
        if not self.bottom_shapes:
            raise self.fail("needs at least 1 bottom")
        first = self.bottom_shapes[0]
        if cp.HasField("concat_dim") and cp.HasField("axis"):
            raise self.fail("either axis or concat_dim should be specified; not both")
        if cp.HasField("concat_dim"):
            self.axis = int(cp.concat_dim)
            if self.axis >= len(first):
                raise self.fail(f"concat_dim {self.axis} out of range for a {len(first)}-axis bottom")
        else:
            self.axis = _axis(self, cp.axis, len(first))
        total = 0
        for i, s in enumerate(self.bottom_shapes):
            if len(s) != len(first):
                raise self.fail(f"all bottoms need the same number of axes: {first} vs {s}")
            for d in range(len(first)):
                if d != self.axis and s[d] != first[d]:
                    raise self.fail(
                        f"bottom {i} shape {s} differs from bottom 0 shape {first} "
                        f"outside the concat axis {self.axis}"
                    )
            total += s[self.axis]
        top = list(first)
        top[self.axis] = total
        self.top_shapes = [tuple(top)]

    def forward(self, blobs, bottoms, *, rng, train):
        if len(bottoms) == 1:
            return [bottoms[0]]
        return [jnp.concatenate(list(bottoms), axis=self.axis)]


# Caffe: src/caffe/layers/flatten_layer.cpp.
@register
class Flatten(Layer):
    """Merge axes [axis, end_axis] into one."""

    type_name = "Flatten"

    def setup(self) -> None:
        fp = self.param.flatten_param
        shape = _one_bottom(self)
        start = _axis(self, fp.axis, len(shape))
        end = _axis(self, fp.end_axis, len(shape), "end_axis")
        if end < start:
            raise self.fail(f"end_axis {fp.end_axis} comes before axis {fp.axis} for bottom {shape}")
        self.top_shapes = [tuple(shape[:start]) + (count(shape, start, end + 1),) + tuple(shape[end + 1 :])]

    def forward(self, blobs, bottoms, *, rng, train):
        return [bottoms[0].reshape(self.top_shapes[0])]


_ELTWISE_OPS = {
    caffe_pb2.EltwiseParameter.PROD: "PROD",
    caffe_pb2.EltwiseParameter.SUM: "SUM",
    caffe_pb2.EltwiseParameter.MAX: "MAX",
}


# Caffe: src/caffe/layers/eltwise_layer.cpp.
@register
class Eltwise(Layer):
    """Elementwise SUM (with optional coefficients), PROD or MAX of equally shaped bottoms."""

    type_name = "Eltwise"

    def setup(self) -> None:
        ep = self.param.eltwise_param
        if len(self.bottom_shapes) < 2:
            raise self.fail(f"needs at least 2 bottoms, got {len(self.bottom_shapes)}")
        first = self.bottom_shapes[0]
        for i, s in enumerate(self.bottom_shapes[1:], 1):
            if s != first:
                raise self.fail(f"bottom {i} shape {s} differs from bottom 0 shape {first}")
        self.op = _ELTWISE_OPS[ep.operation]
        coeff = list(ep.coeff)
        if coeff and self.op != "SUM":
            raise self.fail("Eltwise layer only takes coefficients for summation")
        if coeff and len(coeff) != len(self.bottom_shapes):
            raise self.fail(
                f"{len(coeff)} coefficients for {len(self.bottom_shapes)} bottoms; "
                "give one coefficient per bottom"
            )
        self.coeff = [np.float32(c) for c in coeff] or None
        self.top_shapes = [first]

    def forward(self, blobs, bottoms, *, rng, train):
        xs = list(bottoms)
        if self.op == "SUM":
            if self.coeff is None:
                y = xs[0]
                for x in xs[1:]:
                    y = y + x
                return [y]
            y = self.coeff[0] * xs[0]
            for c, x in zip(self.coeff[1:], xs[1:]):
                y = y + c * x
            return [y]
        if self.op == "PROD":
            y = xs[0]
            for x in xs[1:]:
                y = y * x
            return [y]
        # MAX: Caffe keeps the earliest bottom on ties (`bottom > top` with bottom 0 first) and
        # routes the whole gradient to it; jnp.maximum would split ties 50/50.
        y = xs[0]
        for x in xs[1:]:
            y = jnp.where(x > y, x, y)
        return [y]


# Caffe: src/caffe/layers/split_layer.cpp.
@register
class Split(Layer):
    """Copies its bottom to every top; the gradients of the copies add up."""

    type_name = "Split"

    def setup(self) -> None:
        shape = _one_bottom(self)
        self.top_shapes = [shape] * len(self.param.top)

    def forward(self, blobs, bottoms, *, rng, train):
        return [bottoms[0]] * len(self.top_shapes)


# Caffe: src/caffe/layers/reshape_layer.cpp.
@register
class Reshape(Layer):
    """Replace axes [axis, axis+num_axes) by `shape`; 0 copies the bottom's dim, -1 infers one."""

    type_name = "Reshape"

    def setup(self) -> None:
        rp = self.param.reshape_param
        shape = _one_bottom(self)
        ndim = len(shape)
        start = rp.axis if rp.axis >= 0 else ndim + rp.axis + 1
        if not 0 <= start <= ndim:
            raise self.fail(f"axis {rp.axis} out of range for a {ndim}-axis bottom")
        if rp.num_axes < -1:
            raise self.fail(f"num_axes must be >= 0, or -1 for all, got {rp.num_axes}")
        end = ndim if rp.num_axes == -1 else start + rp.num_axes
        if end > ndim:
            raise self.fail(f"axis {rp.axis} + num_axes {rp.num_axes} exceeds bottom axes {ndim}")
        dims = [int(d) for d in rp.shape.dim]
        if dims.count(-1) > 1:
            raise self.fail(f"shape {dims}: -1 may appear at most once")
        new: list[int] = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= ndim:
                    raise self.fail(f"shape {dims}: 0 at position {i} has no bottom axis to copy")
                new.append(shape[start + i])
            elif d == -1 or d > 0:
                new.append(d)
            else:
                raise self.fail(f"shape {dims}: dimension {d} must be >= -1")
        top = list(shape[:start]) + new + list(shape[end:])
        total = count(shape)
        if -1 in top:
            known = count([d for d in top if d != -1])
            if known == 0 or total % known:
                raise self.fail(f"cannot infer -1 in {dims} for bottom {shape}")
            top[top.index(-1)] = total // known
        if count(top) != total:
            raise self.fail(f"output count {count(top)} of {tuple(top)} != bottom count {total} of {shape}")
        self.top_shapes = [tuple(top)]

    def forward(self, blobs, bottoms, *, rng, train):
        return [bottoms[0].reshape(self.top_shapes[0])]


__all__ = ["InnerProduct", "Dropout", "Softmax", "Concat", "Flatten", "Eltwise", "Split", "Reshape"]
