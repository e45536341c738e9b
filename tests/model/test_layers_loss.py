"""SoftmaxWithLoss and Accuracy against float64 NumPy transcriptions of
softmax_loss_layer.cpp and accuracy_layer.cpp (ignore_label, normalization modes, top_k ties)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.layers import layer_class
from layer_testing import close, make

FLT_MIN = np.finfo(np.float32).tiny


def loss_ref(x, label, ignore, mode):
    """softmax_loss_layer.cpp Forward_cpu + Backward_cpu with axis 1, float64."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    inner = int(np.prod(x.shape[2:]))
    x3 = x.reshape(n, c, inner)
    e = np.exp(x3 - x3.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    lab = label.reshape(n, inner).astype(int)
    loss, valid, dx = 0.0, 0, prob.copy()
    for i in range(n):
        for j in range(inner):
            if ignore is not None and lab[i, j] == ignore:
                dx[i, :, j] = 0
                continue
            loss -= np.log(max(prob[i, lab[i, j], j], FLT_MIN))
            dx[i, lab[i, j], j] -= 1
            valid += 1
    norm = {"FULL": n * inner, "VALID": valid, "BATCH_SIZE": n, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, (dx / norm).reshape(x.shape), prob.reshape(x.shape)


def run_loss(layer, x, label):
    def f(x, label):
        out, vjp = jax.vjp(lambda x: layer.forward([], [x, label], rng=None, train=True), x)
        return out, vjp([jnp.ones_like(o) if i == 0 else jnp.zeros_like(o) for i, o in enumerate(out)])[0]
    return jax.jit(f)(jnp.asarray(x), jnp.asarray(label))


@pytest.mark.parametrize("param,ignore,mode", [
    ("", None, "VALID"),
    ("loss_param { ignore_label: 2 }", 2, "VALID"),
    ("loss_param { ignore_label: 2 normalization: FULL }", 2, "FULL"),
    ("loss_param { ignore_label: 2 normalization: BATCH_SIZE }", 2, "BATCH_SIZE"),
    ("loss_param { ignore_label: 2 normalization: NONE }", 2, "NONE"),
    ("loss_param { ignore_label: 2 normalize: false }", 2, "BATCH_SIZE"),   # legacy flag
    ("loss_param { ignore_label: 2 normalize: true }", 2, "VALID"),
])
def test_softmax_with_loss_spatial_labels(param, ignore, mode):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((3, 4, 2, 3))).astype(np.float32)
    label = rng.integers(0, 4, size=(3, 2, 3)).astype(np.float32)
    label[0, 0, 0] = label[1, 1, 2] = 2  # make sure some positions are ignored
    layer = make(f'name: "loss" type: "SoftmaxWithLoss" {param}', x.shape, label.shape)
    assert layer.top_shapes == [()] and layer.loss_weights == [1.0]
    ref_loss, ref_dx, _ = loss_ref(x, label, ignore, mode)
    (loss,), dx = run_loss(layer, x, label)
    close(loss, ref_loss)
    close(dx, ref_dx, 1e-6)


def test_softmax_with_loss_all_ignored_and_flt_min_clamp_and_prob_top():
    x = np.array([[0.0, 200.0], [0.0, 200.0]], np.float32)  # prob of class 0 underflows to 0
    label = np.array([0, 1], np.float32)
    lp = text_format.Parse('name: "l" type: "SoftmaxWithLoss" top: "loss" top: "prob" loss_weight: 2',
                           caffe_pb2.LayerParameter())
    layer = layer_class("SoftmaxWithLoss")(lp, [x.shape, label.shape])
    assert layer.top_shapes == [(), (2, 2)] and layer.loss_weights == [2.0, 0.0]
    (loss, prob), dx = run_loss(layer, x, label)
    # -log(FLT_MIN) for the first sample, ~0 for the second, averaged over 2 valid labels.
    close(loss, -np.log(np.float64(FLT_MIN)) / 2)
    close(prob, [[0.0, 1.0], [0.0, 1.0]])
    # Caffe's closed-form gradient survives the clamp: (prob - onehot) / 2.
    close(dx, [[-0.5, 0.5], [0.0, 0.0]])
    layer = make('name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 0 }', (2, 2), (2,))
    (loss,), dx = run_loss(layer, x, np.zeros(2, np.float32))
    assert float(loss) == 0.0 and not np.any(np.asarray(dx))


def test_softmax_with_loss_label_count_mismatch():
    with pytest.raises(ImagenetError, match="number of labels"):
        make('name: "l" type: "SoftmaxWithLoss"', (2, 3, 2, 2), (2,))


def acc_ref(x, label, k, ignore):
    """accuracy_layer.cpp (master): hit if fewer than k other classes score >= the true one."""
    n, c = x.shape[:2]
    inner = int(np.prod(x.shape[2:]))
    x3, lab = x.reshape(n, c, inner), label.reshape(n, inner).astype(int)
    hits = count = 0
    per_hit, per_n = np.zeros(c), np.zeros(c)
    for i in range(n):
        for j in range(inner):
            if ignore is not None and lab[i, j] == ignore:
                continue
            better = sum(x3[i, q, j] >= x3[i, lab[i, j], j] for q in range(c)) - 1
            count += 1
            per_n[lab[i, j]] += 1
            if better < k:
                hits += 1
                per_hit[lab[i, j]] += 1
    per = np.where(per_n == 0, 0, per_hit / np.maximum(per_n, 1))
    return (hits / count if count else 0.0), per


@pytest.mark.parametrize("k,ignore", [(1, None), (2, None), (3, 1), (1, 0)])
def test_accuracy_top_k_ignore_and_per_class(k, ignore):
    rng = np.random.default_rng(1)
    # Small integer scores make ties common; ties count against the true class.
    x = rng.integers(0, 3, size=(6, 4, 1, 2)).astype(np.float32)
    label = rng.integers(0, 4, size=(6, 1, 2)).astype(np.float32)
    extra = f"ignore_label: {ignore}" if ignore is not None else ""
    lp = text_format.Parse(f'name: "a" type: "Accuracy" top: "acc" top: "per_class" '
                           f'accuracy_param {{ top_k: {k} {extra} }}', caffe_pb2.LayerParameter())
    layer = layer_class("Accuracy")(lp, [x.shape, label.shape])
    assert layer.top_shapes == [(), (4,)] and layer.loss_weights == [0.0, 0.0]
    acc, per = jax.jit(lambda a, b: layer.forward([], [a, b], rng=None, train=False))(x, label)
    ref_acc, ref_per = acc_ref(x, label, k, ignore)
    assert float(acc) == pytest.approx(ref_acc, abs=1e-7)
    np.testing.assert_allclose(np.asarray(per), ref_per, atol=1e-7)


def test_accuracy_tie_counts_against_and_all_ignored_gives_zero():
    x = np.array([[1.0, 1.0, 0.0]], np.float32)
    layer = make('name: "a" type: "Accuracy"', x.shape, (1,))
    # Label 1 ties with class 0: one other class scores >= it, so top-1 misses (either label).
    assert float(layer.forward([], [x, np.array([1.0], np.float32)], rng=None, train=False)[0]) == 0.0
    assert float(layer.forward([], [x, np.array([0.0], np.float32)], rng=None, train=False)[0]) == 0.0
    top2 = make('name: "a" type: "Accuracy" accuracy_param { top_k: 2 }', x.shape, (1,))
    assert float(top2.forward([], [x, np.array([0.0], np.float32)], rng=None, train=False)[0]) == 1.0
    ign = make('name: "a" type: "Accuracy" accuracy_param { ignore_label: 1 }', x.shape, (1,))
    assert float(ign.forward([], [x, np.array([1.0], np.float32)], rng=None, train=False)[0]) == 0.0
    with pytest.raises(ImagenetError, match="top_k 4"):
        make('name: "a" type: "Accuracy" accuracy_param { top_k: 4 }', x.shape, (1,))
