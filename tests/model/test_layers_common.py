"""InnerProduct, Dropout, Softmax, Concat, Flatten, Eltwise, Split, Reshape and the
activations (ReLU, Sigmoid, TanH) against float64 NumPy references of Caffe's formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.layers import REGISTRY, layer_class
from layer_testing import close, make, rand


def run(layer, bottoms, blobs=(), train=False, rng=None):
    f = jax.jit(lambda bl, bo, r: layer.forward(bl, bo, rng=r, train=train))
    return f([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms], rng)


def grads(layer, bottoms, dys, blobs=()):
    """vjp of every bottom and blob for cotangents dys (one per top), jitted."""

    def f(bl, bo, dys):
        _, vjp = jax.vjp(lambda bl, bo: layer.forward(bl, bo, rng=None, train=True), bl, bo)
        return vjp(dys)

    return jax.jit(f)([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms],
                      [jnp.asarray(d) for d in dys])


# -- registry -----------------------------------------------------------------------------
def test_registry_has_every_issue_layer_and_lists_them_on_unknown_types():
    wanted = {"Data", "Input", "DummyData", "Convolution", "InnerProduct", "ReLU", "Sigmoid",
              "TanH", "LRN", "Pooling", "Dropout", "Softmax", "SoftmaxWithLoss", "Accuracy",
              "Concat", "Flatten", "Eltwise", "Split", "BatchNorm", "Scale", "Bias", "Reshape"}
    assert wanted <= set(REGISTRY)
    with pytest.raises(ImagenetError, match=r"layer 'x': unknown layer type 'Convolutoin'; supported: .*Convolution"):
        layer_class("Convolutoin", "x")


# -- InnerProduct -------------------------------------------------------------------------
@pytest.mark.parametrize("axis,transpose,bias", [(1, False, True), (2, False, False), (1, True, True), (-1, True, False)])
def test_inner_product(axis, transpose, bias):
    shape = (2, 3, 4, 5)
    text = (f'name: "ip" type: "InnerProduct" inner_product_param {{ num_output: 6 axis: {axis} '
            f'transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} '
            'weight_filler { type: "xavier" } }')
    layer = make(text, shape)
    a = axis % 4
    k = int(np.prod(shape[a:]))
    assert layer.top_shapes == [shape[:a] + (6,)]
    assert layer.blobs[0].shape == ((k, 6) if transpose else (6, k))
    assert layer.blobs[0].filler.type == "xavier"
    x, w = rand(*shape, seed=1), rand(*layer.blobs[0].shape, seed=2)
    blobs = [w]
    x2 = x.astype(np.float64).reshape(-1, k)  # C,H,W-order flattening from `axis`
    ref = x2 @ (w.astype(np.float64) if transpose else w.astype(np.float64).T)
    if bias:
        assert layer.blobs[1].shape == (6,) and layer.blobs[1].filler.type == "constant"
        b = rand(6, seed=3)
        blobs.append(b)
        ref = ref + b
    ref = ref.reshape(shape[:a] + (6,))
    close(run(layer, [x], blobs)[0], ref)
    dy = rand(*ref.shape, seed=4)
    dbl, (dx,) = grads(layer, [x], [dy], blobs)
    dy2 = dy.astype(np.float64).reshape(-1, 6)
    wm = w.astype(np.float64) if transpose else w.astype(np.float64).T  # (K, 6)
    close(dx, (dy2 @ wm.T).reshape(shape), 1e-5)
    dw = x2.T @ dy2
    close(dbl[0], dw if transpose else dw.T, 1e-5)


# -- activations --------------------------------------------------------------------------
def test_relu_and_leaky_relu_forward_and_gradient_at_zero():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]], np.float32)
    dy = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
    for slope in (0.0, 0.1):
        layer = make(f'name: "r" type: "ReLU" relu_param {{ negative_slope: {slope} }}', x.shape)
        ref = np.maximum(x, 0) + np.float32(slope) * np.minimum(x, 0)
        close(run(layer, [x])[0], ref)
        # relu_layer.cpp Backward: top_diff * ((x > 0) + slope * (x <= 0)): slope at x == 0.
        ref_dx = dy * np.where(x > 0, 1.0, np.float32(slope))
        np.testing.assert_array_equal(np.asarray(grads(layer, [x], [dy])[1][0]), ref_dx)


def test_sigmoid_and_tanh():
    x = 4 * rand(3, 7, seed=5)
    dy = rand(3, 7, seed=6)
    x64 = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-x64))
    layer = make('name: "s" type: "Sigmoid"', x.shape)
    close(run(layer, [x])[0], sig)
    close(grads(layer, [x], [dy])[1][0], dy * sig * (1 - sig), 1e-5)
    layer = make('name: "t" type: "TanH"', x.shape)
    close(run(layer, [x])[0], np.tanh(x64))
    close(grads(layer, [x], [dy])[1][0], dy * (1 - np.tanh(x64) ** 2), 1e-5)


# -- Dropout ------------------------------------------------------------------------------
def test_dropout_is_inverted_and_identity_at_test():
    layer = make('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.25 }', (50, 40))
    x = rand(50, 40, seed=7) + 5.0  # no zeros, so kept units are recognisable
    np.testing.assert_array_equal(np.asarray(run(layer, [x])[0]), x)
    (y,) = run(layer, [x], train=True, rng=jax.random.PRNGKey(3))
    y = np.asarray(y)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] * np.float32(1 / 0.75), rtol=1e-7)
    assert 0.70 < kept.mean() < 0.80  # 2000 Bernoulli(0.75) draws
    (y2,) = run(layer, [x], train=True, rng=jax.random.PRNGKey(4))
    assert not np.array_equal(np.asarray(y2) != 0, kept)
    with pytest.raises(ImagenetError, match="dropout_ratio must be in"):
        make('name: "d" type: "Dropout" dropout_param { dropout_ratio: 1.0 }', (2, 2))


# -- Softmax ------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, -1])
def test_softmax(axis):
    x = 10 * rand(2, 4, 3, seed=8)
    layer = make(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', x.shape)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    close(run(layer, [x])[0], e / e.sum(axis=axis, keepdims=True))


# -- Concat, Flatten, Split, Reshape ------------------------------------------------------
def test_concat_axis_and_legacy_concat_dim():
    a, b = rand(2, 3, 4, seed=9), rand(2, 5, 4, seed=10)
    layer = make('name: "c" type: "Concat"', a.shape, b.shape)
    assert layer.top_shapes == [(2, 8, 4)]
    np.testing.assert_array_equal(np.asarray(run(layer, [a, b])[0]), np.concatenate([a, b], 1))
    c = rand(2, 3, 6, seed=11)
    layer = make('name: "c" type: "Concat" concat_param { concat_dim: 2 }', a.shape, c.shape)
    np.testing.assert_array_equal(np.asarray(run(layer, [a, c])[0]), np.concatenate([a, c], 2))
    layer = make('name: "c" type: "Concat" concat_param { axis: -1 }', a.shape, c.shape)
    assert layer.top_shapes == [(2, 3, 10)]
    with pytest.raises(ImagenetError, match="outside the concat axis"):
        make('name: "c" type: "Concat"', a.shape, c.shape)
    # Gradients are split back per bottom.
    dy = rand(2, 8, 4, seed=12)
    _, (da, db) = grads(make('name: "c" type: "Concat"', a.shape, b.shape), [a, b], [dy])
    np.testing.assert_array_equal(np.asarray(da), dy[:, :3])
    np.testing.assert_array_equal(np.asarray(db), dy[:, 3:])


def test_flatten():
    x = rand(2, 3, 4, 5, seed=13)
    assert make('name: "f" type: "Flatten"', x.shape).top_shapes == [(2, 60)]
    layer = make('name: "f" type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', x.shape)
    assert layer.top_shapes == [(2, 12, 5)]
    np.testing.assert_array_equal(np.asarray(run(layer, [x])[0]), x.reshape(2, 12, 5))


def test_split_copies_and_sums_gradients():
    lp = text_format.Parse('name: "s" type: "Split" top: "a" top: "b" top: "c"', caffe_pb2.LayerParameter())
    layer = layer_class("Split")(lp, [(2, 3)])
    x = rand(2, 3, seed=14)
    tops = run(layer, [x])
    assert len(tops) == 3 and all(np.array_equal(np.asarray(t), x) for t in tops)
    dys = [rand(2, 3, seed=s) for s in (15, 16, 17)]
    _, (dx,) = grads(layer, [x], dys)
    close(dx, sum(d.astype(np.float64) for d in dys))


@pytest.mark.parametrize("spec,axis,num_axes,expected", [
    ("dim: 0 dim: -1", 0, -1, (2, 60)),
    ("dim: 6 dim: 10", 1, -1, (2, 6, 10)),
    ("dim: 2 dim: 2", 2, 1, (2, 3, 2, 2, 5)),
    ("dim: 1", -1, 0, (2, 3, 4, 5, 1)),
])
def test_reshape(spec, axis, num_axes, expected):
    x = rand(2, 3, 4, 5, seed=18)
    layer = make(f'name: "r" type: "Reshape" reshape_param {{ shape {{ {spec} }} axis: {axis} num_axes: {num_axes} }}', x.shape)
    assert layer.top_shapes == [expected]
    np.testing.assert_array_equal(np.asarray(run(layer, [x])[0]), x.reshape(expected))


def test_reshape_rejects_bad_counts():
    with pytest.raises(ImagenetError, match="output count"):
        make('name: "r" type: "Reshape" reshape_param { shape { dim: 5 dim: 0 } }', (2, 3, 4))
    with pytest.raises(ImagenetError, match="cannot infer -1"):
        make('name: "r" type: "Reshape" reshape_param { shape { dim: 7 dim: -1 dim: 0 } }', (2, 3, 4))
    with pytest.raises(ImagenetError, match="at most once"):
        make('name: "r" type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', (2, 3))


# -- Eltwise ------------------------------------------------------------------------------
def test_eltwise_sum_with_coeff_prod_and_max():
    a, b, c = rand(2, 3, 4, seed=19), rand(2, 3, 4, seed=20), rand(2, 3, 4, seed=21)
    a64, b64, c64 = (t.astype(np.float64) for t in (a, b, c))
    s = make('name: "e" type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -2 coeff: 0.5 }',
             a.shape, b.shape, c.shape)
    close(run(s, [a, b, c])[0], a64 - 2 * b64 + 0.5 * c64)
    p = make('name: "e" type: "Eltwise" eltwise_param { operation: PROD }', a.shape, b.shape, c.shape)
    close(run(p, [a, b, c])[0], a64 * b64 * c64)
    m = make('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', a.shape, b.shape, c.shape)
    close(run(m, [a, b, c])[0], np.maximum(np.maximum(a64, b64), c64))
    dy = rand(2, 3, 4, seed=22).astype(np.float64)
    _, (da, db, dc) = grads(p, [a, b, c], [dy])
    close(da, dy * b64 * c64, 1e-5)
    close(dc, dy * a64 * b64, 1e-5)


def test_eltwise_max_routes_ties_to_the_first_bottom():
    """eltwise_layer.cpp: the mask keeps the earliest bottom unless a later one is strictly
    greater, so a tie sends the whole gradient to the first tied bottom."""
    a = np.array([[1.0, 2.0, 3.0]], np.float32)
    b = np.array([[1.0, 5.0, 3.0]], np.float32)
    c = np.array([[0.0, 5.0, 3.0]], np.float32)
    m = make('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', a.shape, b.shape, c.shape)
    dy = np.array([[10.0, 20.0, 30.0]], np.float32)
    _, (da, db, dc) = grads(m, [a, b, c], [dy])
    np.testing.assert_array_equal(np.asarray(da), [[10.0, 0.0, 30.0]])
    np.testing.assert_array_equal(np.asarray(db), [[0.0, 20.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(dc), [[0.0, 0.0, 0.0]])


def test_eltwise_rejects_bad_params():
    with pytest.raises(ImagenetError, match="only takes coefficients for summation"):
        make('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', (2,), (2,))
    with pytest.raises(ImagenetError, match="one coefficient per bottom"):
        make('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }', (2,), (2,))
    with pytest.raises(ImagenetError, match="differs from bottom 0"):
        make('name: "e" type: "Eltwise"', (2,), (3,))
