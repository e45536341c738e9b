"""Classification heads: SoftmaxWithLoss and Accuracy (Caffe's arithmetic, incl. ignore_label).

Both take (scores, label) bottoms; labels may arrive as float (Caffe's blobs are float) or int
and are truncated to int as Caffe's static_cast<int> does. `loss_weight` is applied by the Net
through Layer.loss_weights.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data.labels import LabelCheck
from data.proto import caffe_pb2
from model.layers.base import Layer, Shape, register
from model.layers.shapes import canonical_axis, count

FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # Caffe clamps prob at FLT_MIN before log

_NORMALIZATION = {
    caffe_pb2.LossParameter.FULL: "FULL",
    caffe_pb2.LossParameter.VALID: "VALID",
    caffe_pb2.LossParameter.BATCH_SIZE: "BATCH_SIZE",
    caffe_pb2.LossParameter.NONE: "NONE",
}


def _labels_2d(label: jax.Array, outer: int, inner: int) -> jax.Array:
    """Labels as (outer, inner) int32; float labels truncate like static_cast<int>."""
    return jax.lax.stop_gradient(label).reshape(outer, inner).astype(jnp.int32)


def _pick(scores3: jax.Array, safe_labels: jax.Array) -> jax.Array:
    """scores3 (outer, C, inner), labels (outer, inner) -> scores3[o, label, i]."""
    return jnp.take_along_axis(scores3, safe_labels[:, None, :], axis=1)[:, 0, :]


def make_softmax_loss(
    shape: Shape, axis: int, ignore_label: int | None, normalization: str
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(scores, label) -> (loss, prob) as softmax_loss_layer.cpp computes them.

    loss = -sum over non-ignored positions of log(max(prob[label], FLT_MIN)) / normalizer, with
    normalizer = max(1, FULL: outer*inner | VALID: #non-ignored | BATCH_SIZE: outer | NONE: 1).
    The gradient is Caffe's closed form (prob - onehot(label)) / normalizer, zero at ignored
    positions (a custom VJP: autodiff through the FLT_MIN clamp would zero it for tiny probs).
    """
    outer, classes, inner = count(shape, 0, axis), shape[axis], count(shape, axis + 1)

    def parts(x: jax.Array, label: jax.Array):
        prob = jax.nn.softmax(x, axis=axis)
        prob3 = prob.reshape(outer, classes, inner)
        lab = _labels_2d(label, outer, inner)
        valid = jnp.ones(lab.shape, bool) if ignore_label is None else lab != ignore_label
        safe = jnp.where(valid, jnp.clip(lab, 0, classes - 1), 0)
        if normalization == "FULL":
            norm = jnp.float32(outer * inner)
        elif normalization == "VALID":
            norm = jnp.sum(valid).astype(jnp.float32)
        elif normalization == "BATCH_SIZE":
            norm = jnp.float32(outer)
        else:
            norm = jnp.float32(1.0)
        norm = jnp.maximum(norm, jnp.float32(1.0))
        return prob, prob3, safe, valid, norm

    @jax.custom_vjp
    def loss_fn(x: jax.Array, label: jax.Array) -> jax.Array:
        prob, prob3, safe, valid, norm = parts(x, label)
        nll = -jnp.log(jnp.maximum(_pick(prob3, safe), FLT_MIN))
        return jnp.sum(jnp.where(valid, nll, 0.0)) / norm

    def fwd(x, label):
        prob, prob3, safe, valid, norm = parts(x, label)
        nll = -jnp.log(jnp.maximum(_pick(prob3, safe), FLT_MIN))
        loss = jnp.sum(jnp.where(valid, nll, 0.0)) / norm
        return loss, (prob3, safe, valid, norm, label)

    def bwd(res, g):
        prob3, safe, valid, norm, label = res
        onehot = jax.nn.one_hot(safe, classes, axis=1, dtype=prob3.dtype)
        dx = jnp.where(valid[:, None, :], prob3 - onehot, 0.0) * (g / norm)
        return dx.reshape(shape), jnp.zeros_like(label)

    loss_fn.defvjp(fwd, bwd)

    def apply(x: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
        label = jax.lax.stop_gradient(label.astype(jnp.float32))
        return loss_fn(x, label), jax.nn.softmax(x, axis=axis)

    return apply


def _check_label_count(layer: Layer, outer: int, inner: int) -> None:
    labels = count(layer.bottom_shapes[1])
    if outer * inner != labels:
        raise layer.fail(
            f"number of labels ({labels}, bottom shape {layer.bottom_shapes[1]}) must match "
            f"number of predictions ({outer}*{inner} for scores {layer.bottom_shapes[0]}); e.g. "
            "with axis 1 and scores (N, C, H, W) the label count must be N*H*W"
        )


# Caffe: src/caffe/layers/softmax_loss_layer.cpp (+ loss_layer.cpp).
@register
class SoftmaxWithLoss(Layer):
    """Multinomial logistic loss of the softmax of the scores; optional second top = prob."""

    type_name = "SoftmaxWithLoss"
    is_loss = True

    def setup(self) -> None:
        if len(self.bottom_shapes) != 2:
            raise self.fail(f"takes 2 bottoms (scores, label), got {len(self.bottom_shapes)}")
        if len(self.param.top) not in (1, 2):
            raise self.fail(f"has 1 or 2 tops (loss[, prob]), got {list(self.param.top)}")
        shape = self.bottom_shapes[0]
        try:
            self.axis = canonical_axis(self.param.softmax_param.axis, len(shape))
        except ValueError as e:
            raise self.fail(str(e)) from None
        outer, inner = count(shape, 0, self.axis), count(shape, self.axis + 1)
        _check_label_count(self, outer, inner)
        lp = self.param.loss_param
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        # loss_layer.cpp: the legacy `normalize` flag only applies when `normalization` is unset.
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = "VALID" if lp.normalize else "BATCH_SIZE"
        else:
            self.normalization = _NORMALIZATION[lp.normalization]
        self.top_shapes = [()] + ([shape] if len(self.param.top) == 2 else [])
        self._fn = make_softmax_loss(shape, self.axis, self.ignore_label, self.normalization)

    def label_checks(self) -> dict[int, LabelCheck]:
        # softmax_loss_layer.cpp: DCHECK_GE(label_value, 0); DCHECK_LT(label_value, channels).
        return {1: LabelCheck(self.name, self.type_name, self.bottom_shapes[0][self.axis],
                              self.ignore_label)}

    def forward(self, blobs, bottoms, *, rng, train):
        loss, prob = self._fn(bottoms[0], bottoms[1])
        return [loss] if len(self.top_shapes) == 1 else [loss, prob]


# Caffe: src/caffe/layers/accuracy_layer.cpp (master).
@register
class Accuracy(Layer):
    """Fraction of non-ignored positions whose label is among the top_k scores.

    Ties count against: a hit needs fewer than top_k classes scoring >= the true class (other
    than itself), Caffe's `num_better_predictions` rule. No non-ignored labels -> 0. An optional
    second top gives the per-class accuracy (0 for classes without samples).
    """

    type_name = "Accuracy"

    def setup(self) -> None:
        ap = self.param.accuracy_param
        if len(self.bottom_shapes) != 2:
            raise self.fail(f"takes 2 bottoms (scores, label), got {len(self.bottom_shapes)}")
        if len(self.param.top) not in (1, 2):
            raise self.fail(f"has 1 or 2 tops (accuracy[, per-class]), got {list(self.param.top)}")
        shape = self.bottom_shapes[0]
        try:
            self.axis = canonical_axis(ap.axis, len(shape))
        except ValueError as e:
            raise self.fail(str(e)) from None
        self.outer, self.inner = count(shape, 0, self.axis), count(shape, self.axis + 1)
        self.classes = shape[self.axis]
        _check_label_count(self, self.outer, self.inner)
        self.top_k = int(ap.top_k)
        if not 1 <= self.top_k <= count(shape) // count(self.bottom_shapes[1]):
            raise self.fail(f"top_k {self.top_k} must be between 1 and the number of classes ({self.classes})")
        self.ignore_label = int(ap.ignore_label) if ap.HasField("ignore_label") else None
        self.top_shapes = [()] + ([(self.classes,)] if len(self.param.top) == 2 else [])

    def label_checks(self) -> dict[int, LabelCheck]:
        # accuracy_layer.cpp: DCHECK_GE(label_value, 0); DCHECK_LT(label_value, num_labels).
        return {1: LabelCheck(self.name, self.type_name, self.classes, self.ignore_label)}

    def forward(self, blobs, bottoms, *, rng, train):
        scores = jax.lax.stop_gradient(bottoms[0]).reshape(self.outer, self.classes, self.inner)
        lab = _labels_2d(bottoms[1], self.outer, self.inner)
        valid = jnp.ones(lab.shape, bool) if self.ignore_label is None else lab != self.ignore_label
        safe = jnp.where(valid, jnp.clip(lab, 0, self.classes - 1), 0)
        true_score = _pick(scores, safe)
        better = jnp.sum(scores >= true_score[:, None, :], axis=1) - 1
        hit = valid & (better < self.top_k)
        n_valid = jnp.sum(valid)
        acc = jnp.where(n_valid == 0, 0.0, jnp.sum(hit) / jnp.maximum(n_valid, 1)).astype(jnp.float32)
        if len(self.top_shapes) == 1:
            return [acc]
        onehot = jax.nn.one_hot(safe, self.classes, dtype=jnp.float32)  # (outer, inner, C)
        per_count = jnp.sum(onehot * valid[..., None], axis=(0, 1))
        per_hit = jnp.sum(onehot * hit[..., None], axis=(0, 1))
        per_class = jnp.where(per_count == 0, 0.0, per_hit / jnp.maximum(per_count, 1.0))
        return [acc, per_class.astype(jnp.float32)]


__all__ = ["SoftmaxWithLoss", "Accuracy", "make_softmax_loss", "FLT_MIN"]
