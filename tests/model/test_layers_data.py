"""Data, Input and DummyData: the top-shape conventions the Net relies on, fed tops passed
through, generated tops (dummy_data_layer.cpp, input_layer.cpp, data_layer.cpp)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.layers import layer_class

DATA = '''name: "data" type: "Data" top: "data" top: "label"
  transform_param { crop_size: 57 mirror: true }
  data_param { source: "x_lmdb" batch_size: 8 backend: LMDB }'''


def parse(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def test_data_top_shapes_for_and_given_shapes():
    lp = parse(DATA)
    Data = layer_class("Data")
    assert Data.is_input and Data.feeds_from_batch
    shapes = Data.top_shapes_for(lp, (3, 64, 64))
    assert shapes == [(8, 3, 57, 57), (8,)]
    no_crop = parse(DATA.replace("crop_size: 57", ""))
    assert Data.top_shapes_for(no_crop, (1, 32, 48)) == [(8, 1, 32, 48), (8,)]
    layer = Data(lp, [], given_top_shapes=shapes)
    assert layer.top_shapes == shapes and layer.blobs == []
    with pytest.raises(ImagenetError, match="crop_size 57 is larger"):
        Data.top_shapes_for(lp, (3, 32, 32))
    with pytest.raises(ImagenetError, match="must pass given_top_shapes"):
        Data(lp, [])
    with pytest.raises(ImagenetError, match="label shape"):
        Data(lp, [], given_top_shapes=[(8, 3, 57, 57), (4,)])


def test_fed_layers_return_the_fed_arrays_and_check_shapes():
    lp = parse(DATA)
    layer = layer_class("Data")(lp, [], given_top_shapes=[(2, 3, 4, 4), (2,)])
    data, label = jnp.ones((2, 3, 4, 4)), jnp.arange(2.0)
    out = layer.forward([], [data, label], rng=None, train=True)
    assert out[0] is data and out[1] is label
    with pytest.raises(ImagenetError, match="fed with shape"):
        layer.forward([], [jnp.ones((2, 3, 5, 5)), label], rng=None, train=True)


def test_input_shapes_from_prototxt_or_given():
    Input = layer_class("Input")
    one = parse('name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } }')
    assert Input(one, []).top_shapes == [(2, 3), (2, 3)]
    per = parse('name: "in" type: "Input" top: "a" top: "b" '
                'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } }')
    assert Input(per, []).top_shapes == [(2, 3), (2,)]
    assert Input(per, [], given_top_shapes=[(5, 3), (5,)]).top_shapes == [(5, 3), (5,)]
    bad = parse('name: "in" type: "Input" top: "a" top: "b" top: "c" '
                'input_param { shape { dim: 2 } shape { dim: 3 } }')
    with pytest.raises(ImagenetError, match="2 shapes for 3 tops"):
        Input(bad, [])


def test_dummy_data_constant_gaussian_and_legacy_shapes():
    DummyData = layer_class("DummyData")
    assert DummyData.is_input and not DummyData.feeds_from_batch
    lp = parse('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
               'shape { dim: 2 dim: 3 } shape { dim: 2 } '
               'data_filler { type: "constant" value: 7 } '
               'data_filler { type: "gaussian" mean: 1 std: 0.5 } }')
    layer = DummyData(lp, [])
    assert layer.top_shapes == [(2, 3), (2,)]
    a, b = layer.forward([], [], rng=jax.random.PRNGKey(0), train=True)
    np.testing.assert_array_equal(np.asarray(a), np.full((2, 3), 7.0, np.float32))
    assert b.shape == (2,) and not np.allclose(np.asarray(b), 1.0)
    legacy = parse('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                   'num: 4 channels: 3 channels: 1 height: 5 width: 6 }')
    layer = DummyData(legacy, [])
    assert layer.top_shapes == [(4, 3, 5, 6), (4, 1, 5, 6)]
    zeros = layer.forward([], [], rng=None, train=False)  # default filler: constant 0
    assert all(not np.any(np.asarray(t)) for t in zeros)
    with pytest.raises(ImagenetError, match="data_filler type 'xavier' not supported"):
        DummyData(parse('name: "d" type: "DummyData" top: "a" dummy_data_param { '
                        'shape { dim: 2 } data_filler { type: "xavier" } }'), [])
