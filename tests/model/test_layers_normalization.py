"""BatchNorm (train/test, statistics updates, backward), Scale and Bias against float64
NumPy transcriptions of batch_norm_layer.cpp, scale_layer.cpp and bias_layer.cpp."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.errors import ImagenetError
from layer_testing import close, make, rand


EPS = 1e-5
MAF = 0.999


def bn_train_ref(x, dy):
    """Caffe's TRAIN forward (biased batch variance) and its Backward_cpu formula."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    std = np.sqrt(var + EPS)
    y = (x - mean) / std
    dx = (dy - dy.mean(axis=axes, keepdims=True) - (dy * y).mean(axis=axes, keepdims=True) * y) / std
    return y, dx, mean.ravel(), var.ravel()


def test_batchnorm_blobs_and_train_forward_backward_and_stat_updates():
    x, dy = 2 + 3 * rand(4, 3, 2, 5, seed=1), rand(4, 3, 2, 5, seed=2)
    layer = make('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: false }', x.shape)
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert not any(b.learnable for b in layer.blobs)
    blobs = [rand(3, seed=3), np.abs(rand(3, seed=4)), np.array([2.5], np.float32)]

    def step(bl, x, dy):
        y, vjp = jax.vjp(lambda x: layer.forward(bl, [x], rng=None, train=True)[0], x)
        return y, vjp(dy)[0], layer.updated_blobs(bl, [x], train=True)

    y, dx, new = jax.jit(step)([jnp.asarray(b) for b in blobs], jnp.asarray(x), jnp.asarray(dy))
    ref_y, ref_dx, mean, var = bn_train_ref(x, dy)
    close(y, ref_y)
    close(dx, ref_dx, 1e-5)
    m = x.size // 3  # 40 values per channel -> unbiased factor 40/39 for the stored variance
    close(new[0], blobs[0] * MAF + mean)
    close(new[1], blobs[1] * MAF + m / (m - 1) * var)
    close(new[2], [2.5 * MAF + 1])


def test_batchnorm_global_stats_divide_by_scale_factor_and_zero_factor():
    x = rand(2, 3, 2, 2, seed=5)
    mean_sum, var_sum = rand(3, seed=6), np.abs(rand(3, seed=7)) + 0.5
    layer = make('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.001 }', x.shape)
    for factor in (4.0, 0.0):
        blobs = [mean_sum, var_sum, np.array([factor], np.float32)]
        (y,) = jax.jit(lambda bl, x: layer.forward(bl, [x], rng=None, train=True))(blobs, x)
        inv = 0.0 if factor == 0 else 1 / factor
        mu, var = mean_sum.astype(np.float64) * inv, var_sum.astype(np.float64) * inv
        ref = (x - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + np.float32(0.001))
        close(y, ref)
        assert layer.updated_blobs(blobs, [x], train=True) is None


def test_batchnorm_use_global_stats_default_follows_phase():
    x = rand(2, 2, 3, 3, seed=8)
    blobs = [np.zeros(2, np.float32), np.ones(2, np.float32), np.array([1.0], np.float32)]
    test_phase = make('name: "bn" type: "BatchNorm" phase: TEST', x.shape)
    train_phase = make('name: "bn" type: "BatchNorm" phase: TRAIN', x.shape)
    unset = make('name: "bn" type: "BatchNorm"', x.shape)
    stored = x / np.sqrt(1 + EPS)
    close(test_phase.forward(blobs, [x], rng=None, train=True)[0], stored)
    close(train_phase.forward(blobs, [x], rng=None, train=False)[0], bn_train_ref(x, x)[0])
    # Without a phase on the LayerParameter the `train` flag decides.
    close(unset.forward(blobs, [x], rng=None, train=False)[0], stored)
    close(unset.forward(blobs, [x], rng=None, train=True)[0], bn_train_ref(x, x)[0])
    with pytest.raises(ImagenetError, match="lr_mult must be 0"):
        make('name: "bn" type: "BatchNorm" param { lr_mult: 1 }', x.shape)


@pytest.mark.parametrize("text,operand_shape", [
    ("", (3,)),
    ("scale_param { axis: 1 num_axes: 2 }", (3, 4)),
    ("scale_param { axis: -1 }", (5,)),
    ("scale_param { num_axes: -1 }", (3, 4, 5)),
    ("scale_param { num_axes: 0 }", ()),
])
def test_scale_learned_operand(text, operand_shape):
    shape = (2, 3, 4, 5)
    layer = make(f'name: "s" type: "Scale" {text}', shape)
    assert [b.shape for b in layer.blobs] == [operand_shape]
    # scale_layer.cpp: the default filler is constant 1.
    assert layer.blobs[0].filler.type == "constant" and layer.blobs[0].filler.value == 1.0
    x, s = rand(*shape, seed=9), rand(*operand_shape, seed=10)
    ref = x.astype(np.float64) * _bcast(s, shape, operand_shape)
    close(jax.jit(lambda bl, x: layer.forward(bl, [x], rng=None, train=True))([s], x)[0], ref)


def _bcast(operand, shape, operand_shape):
    """Place the operand on the axes of `shape` it matches (first match from the left)."""
    operand = np.asarray(operand, np.float64)
    for axis in range(len(shape) - len(operand_shape) + 1):
        if tuple(shape[axis:axis + len(operand_shape)]) == tuple(operand_shape):
            return operand.reshape((1,) * axis + tuple(operand_shape) + (1,) * (len(shape) - axis - len(operand_shape)))
    raise AssertionError


def test_scale_with_bias_term_and_gradients():
    shape = (2, 3, 2, 2)
    layer = make('name: "s" type: "Scale" scale_param { bias_term: true '
                 'bias_filler { type: "constant" value: 0.5 } }', shape)
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    assert layer.blobs[1].filler.value == 0.5
    x, s, b, dy = rand(*shape, seed=11), rand(3, seed=12), rand(3, seed=13), rand(*shape, seed=14)

    def f(bl, x, dy):
        y, vjp = jax.vjp(lambda bl, x: layer.forward(bl, [x], rng=None, train=True)[0], bl, x)
        return y, vjp(dy)

    y, (dbl, dx) = jax.jit(f)([s, b], x, dy)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    close(y, x64 * s[None, :, None, None] + b[None, :, None, None])
    close(dx, dy64 * s[None, :, None, None])
    close(dbl[0], (dy64 * x64).sum(axis=(0, 2, 3)), 1e-5)
    close(dbl[1], dy64.sum(axis=(0, 2, 3)), 1e-5)


def test_scale_and_bias_from_a_second_bottom():
    x, s = rand(2, 3, 4, seed=15), rand(3, 4, seed=16)
    layer = make('name: "s" type: "Scale"', x.shape, s.shape)
    assert layer.blobs == []
    close(layer.forward([], [x, s], rng=None, train=True)[0], x.astype(np.float64) * s[None])
    layer = make('name: "b" type: "Bias" bias_param { axis: 0 }', x.shape, (2,))
    b = rand(2, seed=17)
    close(layer.forward([], [x, b], rng=None, train=True)[0], x.astype(np.float64) + b[:, None, None])
    with pytest.raises(ImagenetError, match="must match bottom 0"):
        make('name: "s" type: "Scale"', x.shape, (4,))


def test_bias_learned_operand_default_filler_zero():
    x = rand(2, 3, 4, seed=18)
    layer = make('name: "b" type: "Bias"', x.shape)
    assert [b.shape for b in layer.blobs] == [(3,)]
    assert layer.blobs[0].filler.type == "constant" and layer.blobs[0].filler.value == 0.0
    b = rand(3, seed=19)
    close(layer.forward([b], [x], rng=None, train=True)[0], x.astype(np.float64) + b[None, :, None])
