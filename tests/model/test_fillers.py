"""model/fillers.py: Caffe's filler distributions (filler.hpp), fans and determinism."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.fillers import fans, fill

KEY = jax.random.PRNGKey(7)
VN = caffe_pb2.FillerParameter


def _f(**kw) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(**kw)


def test_fans_are_caffes():
    # filler.hpp: fan_in = count / shape[0], fan_out = count / shape[1].
    assert fans((96, 3, 11, 11)) == (3 * 121, 96 * 121)
    assert fans((10, 64)) == (64, 10)
    assert fans((7,)) == (1, 7)


def test_constant_and_default_zero():
    x = np.asarray(fill(_f(type="constant", value=0.1), (3, 4), KEY))
    assert x.dtype == np.float32 and x.shape == (3, 4) and np.all(x == np.float32(0.1))
    assert np.all(np.asarray(fill(None, (2,), KEY)) == 0)
    assert np.all(np.asarray(fill(caffe_pb2.FillerParameter(), (2,), KEY)) == 0)


def test_uniform_range():
    x = np.asarray(fill(_f(type="uniform", min=-2, max=3), (10000,), KEY))
    assert x.min() >= -2 and x.max() <= 3
    assert x.mean() == pytest.approx(0.5, abs=0.1)


def test_gaussian_moments_and_determinism():
    f = _f(type="gaussian", mean=1.0, std=0.01)
    x = np.asarray(fill(f, (200, 100), KEY))
    assert x.mean() == pytest.approx(1.0, abs=1e-3)
    assert x.std() == pytest.approx(0.01, rel=0.03)
    assert np.array_equal(x, np.asarray(fill(f, (200, 100), KEY)))
    assert not np.array_equal(x, np.asarray(fill(f, (200, 100), jax.random.PRNGKey(8))))


def test_gaussian_sparse_keeps_sparse_over_num_outputs():
    x = np.asarray(fill(_f(type="gaussian", std=1, sparse=5), (50, 400), KEY))
    # GaussianFiller: non-zero probability = sparse / shape[0] = 0.1.
    assert np.mean(x != 0) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("norm, n", [(VN.FAN_IN, 3 * 9), (VN.FAN_OUT, 64 * 9),
                                     (VN.AVERAGE, (27 + 576) / 2)])
def test_xavier_bound(norm, n):
    x = np.asarray(fill(_f(type="xavier", variance_norm=norm), (64, 3, 3, 3), KEY))
    bound = math.sqrt(3.0 / n)
    assert np.abs(x).max() <= bound
    assert np.abs(x).max() > 0.95 * bound
    assert x.var() == pytest.approx(1.0 / n, rel=0.1)


@pytest.mark.parametrize("norm, n", [(VN.FAN_IN, 16 * 25), (VN.FAN_OUT, 32 * 25)])
def test_msra_std(norm, n):
    x = np.asarray(fill(_f(type="msra", variance_norm=norm), (32, 16, 5, 5), KEY))
    assert x.std() == pytest.approx(math.sqrt(2.0 / n), rel=0.05)


def test_positive_unitball_rows_sum_to_one():
    x = np.asarray(fill(_f(type="positive_unitball"), (6, 2, 3, 3), KEY))
    assert np.all(x >= 0)
    np.testing.assert_allclose(x.reshape(6, -1).sum(axis=1), 1.0, rtol=1e-6)


def test_bilinear_matches_caffes_loop():
    shape = (2, 1, 4, 4)
    x = np.asarray(fill(_f(type="bilinear"), shape, KEY))
    # BilinearFiller::Fill, element by element in float64.
    f = math.ceil(shape[3] / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ref = np.empty(int(np.prod(shape)))
    for i in range(ref.size):
        xx, yy = i % shape[3], (i // shape[3]) % shape[2]
        ref[i] = (1 - abs(xx / f - c)) * (1 - abs(yy / f - c))
    np.testing.assert_allclose(x.ravel(), ref, rtol=1e-7)
    with pytest.raises(ImagenetError, match="square"):
        fill(_f(type="bilinear"), (1, 1, 3, 4), KEY)


def test_unknown_filler_lists_valid_ones():
    with pytest.raises(ImagenetError, match="gaussian.*msra"):
        fill(_f(type="glorot"), (2, 2), KEY)
