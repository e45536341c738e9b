"""model/caffemodel.py: reading and writing .caffemodel files like Caffe, copying by layer name;
shared parameters (ParamSpec name) through Net, init, apply and saving."""
from __future__ import annotations

import contextlib
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import json_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.caffemodel import (
    check_coverage,
    copy_layers,
    layers_needing_weights,
    load_caffemodel,
    net_to_proto,
    read_net_binary,
    save_caffemodel,
)
from model.net import Net
from model.prototxt import parse_net_text


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def train_net(golden):
    with contextlib.chdir(golden):
        return Net.from_prototxt("net.prototxt", "TRAIN")


@pytest.fixture(scope="module")
def golden_weights(golden):
    return load_caffemodel(golden / "alexmini_iter_10.caffemodel")


def test_load_golden_caffemodel(golden_weights, golden):
    ref = np.load(golden / "params_iter10.npz")
    assert set(golden_weights) >= {"data", "conv1", "relu1", "fc8", "loss"}
    assert golden_weights["relu1"] == []
    for key in ref.files:
        layer, index = key.split("/")
        got = golden_weights[layer][int(index)]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref[key])


def test_written_caffemodel_is_caffes_byte_for_byte(train_net, golden_weights, golden):
    params = copy_layers(train_net, train_net.init(jax.random.PRNGKey(0)), [golden_weights],
                         log=_quiet)
    proto = net_to_proto(train_net, params)
    # Caffe's Net::ToProto of the same TRAIN net and weights, as written by `caffe train`.
    assert proto.SerializeToString() == (golden / "alexmini_iter_10.caffemodel").read_bytes()
    described = json.loads((golden / "alexmini_iter_10.caffemodel.json").read_text())
    assert proto.name == described["name"] and len(proto.layer) == described["num_layers"]
    for lp, ref in zip(proto.layer, described["layers"]):
        assert (lp.name, lp.type) == (ref["name"], ref["type"])
        assert [list(b.shape.dim) for b in lp.blobs] == ref["blob_shapes"]
        sha = [hashlib.sha256(np.asarray(b.data, "<f4").tobytes()).hexdigest() for b in lp.blobs]
        assert sha == ref["blob_sha256"]
    for lp in proto.layer:
        for blob in lp.blobs:
            blob.ClearField("data")
    assert (json_format.MessageToDict(proto, preserving_proto_field_name=True)
            == described["full_message_without_blob_data"])


def test_save_and_load_round_trip(train_net, tmp_path):
    params = train_net.init(jax.random.PRNGKey(3))
    path = tmp_path / "model.caffemodel"
    save_caffemodel(path, train_net, params)
    assert [p.name for p in tmp_path.iterdir()] == ["model.caffemodel"]  # no temp left over
    loaded = load_caffemodel(path)
    for name, blobs in params.items():
        assert len(loaded[name]) == len(blobs)
        for got, want in zip(loaded[name], blobs):
            np.testing.assert_array_equal(got, np.asarray(want))
    again = copy_layers(train_net, train_net.init(jax.random.PRNGKey(4)), [loaded], log=_quiet)
    save_caffemodel(tmp_path / "again.caffemodel", train_net, again)
    assert (tmp_path / "again.caffemodel").read_bytes() == path.read_bytes()
    # Without blobs: the architecture only.
    bare = net_to_proto(train_net, params, with_blobs=False)
    assert all(not lp.blobs for lp in bare.layer) and len(bare.layer) == len(train_net.layers)


def test_finetune_copy_ignores_unknown_layers(golden, golden_weights):
    with contextlib.chdir(golden):
        net = Net.from_prototxt("net_finetune.prototxt", "TRAIN")
    fresh = net.init(jax.random.PRNGKey(0))
    logged: list[str] = []
    params = copy_layers(net, fresh, [golden_weights], log=logged.append)
    assert logged == ["Ignoring source layer fc8"]  # as Caffe's log in train_finetune.log
    np.testing.assert_array_equal(np.asarray(params["conv1"][0]), golden_weights["conv1"][0])
    np.testing.assert_array_equal(np.asarray(params["fc8_ft"][0]), np.asarray(fresh["fc8_ft"][0]))


def test_shape_mismatch_names_layer_and_shapes(train_net, golden_weights):
    bad = {"conv2": [np.zeros((32, 16, 5, 5), np.float32), golden_weights["conv2"][1]]}
    with pytest.raises(ImagenetError) as info:
        copy_layers(train_net, train_net.init(jax.random.PRNGKey(0)), [bad], log=_quiet)
    msg = str(info.value)
    assert "conv2" in msg and "32 16 5 5" in msg and "32 8 5 5" in msg
    with pytest.raises(ImagenetError, match="number of blobs"):
        copy_layers(train_net, train_net.init(jax.random.PRNGKey(0)),
                    [{"fc8": golden_weights["fc8"][:1]}], log=_quiet)


SMALL = """
name: "small"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
"""


def _legacy_blob(arr: np.ndarray, dims4: tuple[int, int, int, int], double: bool = False):
    blob = caffe_pb2.BlobProto(num=dims4[0], channels=dims4[1], height=dims4[2], width=dims4[3])
    (blob.double_data if double else blob.data).extend(arr.ravel().tolist())
    return blob


def test_v1_caffemodel_with_legacy_shapes(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    b = np.array([1, 2, 3, 4], np.float32)
    old = caffe_pb2.NetParameter(name="small")
    fc = old.layers.add(name="fc", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    fc.blobs.append(_legacy_blob(w, (1, 1, 4, 3)))  # old InnerProduct weights: 1x1xOxI
    fc.blobs.append(_legacy_blob(b, (1, 1, 1, 4), double=True))
    old.layers.add(name="gone", type=caffe_pb2.V1LayerParameter.RELU)
    path = tmp_path / "old.caffemodel"
    path.write_bytes(old.SerializeToString())

    assert [lp.type for lp in read_net_binary(path).layer] == ["InnerProduct", "ReLU"]
    loaded = load_caffemodel(path)
    assert loaded["fc"][0].shape == (1, 1, 4, 3) and loaded["gone"] == []
    net = Net.from_prototxt(parse_net_text(SMALL))
    logged: list[str] = []
    params = copy_layers(net, net.init(jax.random.PRNGKey(0)), [loaded], log=logged.append)
    assert logged == ["Ignoring source layer gone"]
    np.testing.assert_array_equal(np.asarray(params["fc"][0]), w)
    np.testing.assert_array_equal(np.asarray(params["fc"][1]), b)
    tops, _ = net.apply(params, {"x": jnp.ones((2, 3))})
    np.testing.assert_allclose(np.asarray(tops["y"]), np.ones((2, 3)) @ w.T + b, rtol=1e-6)


def test_not_a_caffemodel_is_reported(tmp_path):
    path = tmp_path / "junk.caffemodel"
    path.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ImagenetError, match="junk.caffemodel"):
        load_caffemodel(path)


SHARED = """
name: "shared"
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "a" top: "ya"
        param { name: "w" lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "b" top: "yb"
        param { name: "w" } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 bias_filler { type: "constant" value: 1 } } }
layer { name: "sum" type: "Eltwise" bottom: "ya" bottom: "yb" top: "s" loss_weight: 0.5 }
"""


def _shared_net() -> Net:
    return Net.from_prototxt(parse_net_text(SHARED))


def test_shared_params_have_one_owner(tmp_path):
    net = _shared_net()
    keys = [(p.layer, p.index) for p in net.learnable_params]
    assert keys == [("ip1", 0), ("ip1", 1), ("ip2", 1)]  # Caffe's learnable_params
    assert net.learnable_params[0].sharers == (("ip2", 0),)
    assert net.param_owner("ip2", 0) == ("ip1", 0)
    params = net.init(jax.random.PRNGKey(0))
    assert params["ip2"][0] is None
    np.testing.assert_array_equal(np.asarray(params["ip2"][1]), np.ones(3))

    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    batch = {"a": x, "b": 2 * x}
    loss_fn = jax.jit(lambda p: net.apply(p, batch)[1])
    grads = jax.grad(loss_fn)(params)
    # The shared weight's gradient is the sum over both uses (Caffe accumulates the diffs).
    w = np.asarray(params["ip1"][0], np.float64)
    eps = 1e-3
    numeric = np.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            bumped = [dict(params), dict(params)]
            for sign, p in zip((1, -1), bumped):
                p["ip1"] = [params["ip1"][0].at[i, j].add(sign * eps), params["ip1"][1]]
            numeric[i, j] = (float(loss_fn(bumped[0])) - float(loss_fn(bumped[1]))) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads["ip1"][0]), numeric, rtol=2e-2, atol=2e-2)

    # Saved like Caffe: every layer writes its (shared) blobs.
    proto = net_to_proto(net, params)
    by_name = {lp.name: lp for lp in proto.layer}
    assert list(by_name["ip2"].blobs[0].data) == list(by_name["ip1"].blobs[0].data)
    # Copying into the sharing layer writes the owner.
    new_w = np.full((3, 3), 0.5, np.float32)
    copied = copy_layers(net, params, [{"ip2": [new_w, np.zeros(3, np.float32)]}], log=_quiet)
    np.testing.assert_array_equal(np.asarray(copied["ip1"][0]), new_w)
    assert copied["ip2"][0] is None


def test_shared_param_shape_and_lr_mismatch_fail():
    text = SHARED.replace('param { name: "w" } param { lr_mult: 2 decay_mult: 0 }\n'
                          '        inner_product_param { num_output: 3',
                          'param { name: "w" lr_mult: 3 } param { lr_mult: 2 decay_mult: 0 }\n'
                          '        inner_product_param { num_output: 3')
    with pytest.raises(ImagenetError, match="lr_mult"):
        Net.from_prototxt(parse_net_text(text))
    mismatch = """
layer { name: "in" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "a" top: "y1" param { name: "w" }
        inner_product_param { num_output: 3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "a" top: "y2" param { name: "w" }
        inner_product_param { num_output: 5 } }
"""
    with pytest.raises(ImagenetError, match="shared parameter 'w'.*ip1"):
        Net.from_prototxt(parse_net_text(mismatch))


# ---------------------------------------------------------------- weights that cover the net

def _cut_at_layer(path, keep: int) -> bytes:
    """The golden caffemodel's bytes up to the end of its `keep`-th layer: a protobuf prefix of
    whole fields, which still parses."""
    full = path.read_bytes()
    net = caffe_pb2.NetParameter.FromString(full)
    cut = caffe_pb2.NetParameter(name=net.name, layer=net.layer[:keep]).SerializeToString()
    assert full.startswith(cut)
    return cut


def test_empty_and_layerless_weights_are_refused(tmp_path):
    (tmp_path / "zero.caffemodel").write_bytes(b"")
    with pytest.raises(ImagenetError, match="zero.caffemodel: empty weights file"):
        load_caffemodel(tmp_path / "zero.caffemodel")
    (tmp_path / "named.caffemodel").write_bytes(
        caffe_pb2.NetParameter(name="x").SerializeToString())
    with pytest.raises(ImagenetError, match="named.caffemodel: holds no layers"):
        load_caffemodel(tmp_path / "named.caffemodel")


def test_weights_must_cover_the_whole_net_for_scoring(train_net, golden, tmp_path):
    path = golden / "alexmini_iter_10.caffemodel"
    assert check_coverage(train_net, [load_caffemodel(path)], [path], whole_net=True) == []
    for keep in range(1, len(train_net.layers)):
        cut = tmp_path / f"cut{keep}.caffemodel"
        cut.write_bytes(_cut_at_layer(path, keep))
        weights = load_caffemodel(cut)
        missing = [n for n in layers_needing_weights(train_net) if n not in weights]
        if not missing:
            continue  # cut after the last learnable layer: every weight is there
        with pytest.raises(ImagenetError, match=rf"cut{keep}.caffemodel has no weights for "
                                                rf"layer\(s\) '{missing[0]}'"):
            check_coverage(train_net, [weights], [cut], whole_net=True)


def test_finetuning_refuses_a_cut_file_and_accepts_renamed_layers(train_net, golden, tmp_path):
    path = golden / "alexmini_iter_10.caffemodel"
    weights = load_caffemodel(path)
    # Caffe's finetuning recipe: the last layer renamed, so it starts from its filler
    renamed = dict(weights)
    renamed["fc8_new"] = renamed.pop("fc8")
    assert check_coverage(train_net, [renamed], [path], whole_net=False) == ["fc8"]
    # nothing in common: nothing would be copied
    with pytest.raises(ImagenetError, match="weights for none of the .* learnable layers"):
        check_coverage(train_net, [{"other": []}], ["o.caffemodel"], whole_net=False)
    # the first layers of this very net and no more: cut at a layer boundary
    needing = layers_needing_weights(train_net)
    order = [layer.name for layer in train_net.layers]
    keep = order.index(needing[1])  # conv1 and what precedes it, not the next learnable one
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(_cut_at_layer(path, keep))
    with pytest.raises(ImagenetError, match=rf"holds only the first {keep} of the "
                                            rf"{len(order)} layers .* looks cut short"):
        check_coverage(train_net, [load_caffemodel(cut)], [cut], whole_net=False)
