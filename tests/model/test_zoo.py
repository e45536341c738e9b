"""model/zoo: the BVLC prototxts match the published definitions, build, and train on random data.

Slow part (budgeted): one jitted forward/backward of AlexNet at batch 2, a CaffeNet forward and
the mini net's training steps (20-60 s of XLA compilation in all on the shared 2-core machine).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from data.proto import caffe_pb2
from model.net import Net
from model.prototxt import filter_net, read_net_parameter, read_solver_parameter

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"
BVLC = ("bvlc_alexnet", "bvlc_reference_caffenet")
ALEXNET_PARAMS = 60_965_224
BATCH = 2
CROP = 227

ALEXNET_ORDER = ["data", "conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2",
                 "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6",
                 "drop6", "fc7", "relu7", "drop7", "fc8"]
CAFFENET_ORDER = [{"norm1": "pool1", "pool1": "norm1", "norm2": "pool2", "pool2": "norm2"}.get(n, n)
                  for n in ALEXNET_ORDER]
# (num_output, kernel, stride, pad, group, weight std, bias) of bvlc_alexnet.
ALEXNET_CONV = {
    "conv1": (96, 11, 4, 0, 1, 0.01, 0.0),
    "conv2": (256, 5, 1, 2, 2, 0.01, 0.1),
    "conv3": (384, 3, 1, 1, 1, 0.01, 0.0),
    "conv4": (384, 3, 1, 1, 2, 0.01, 0.1),
    "conv5": (256, 3, 1, 1, 2, 0.01, 0.1),
}
ALEXNET_FC = {"fc6": (4096, 0.005, 0.1), "fc7": (4096, 0.005, 0.1), "fc8": (1000, 0.01, 0.0)}


def _layers(model: str, name: str = "train_val"):
    net = read_net_parameter(ZOO / model / f"{name}.prototxt")
    return net, {lp.name: lp for lp in net.layer}


def _conv_facts(lp):
    cp = lp.convolution_param
    return (cp.num_output, cp.kernel_size[0], cp.stride[0] if cp.stride else 1,
            cp.pad[0] if cp.pad else 0, cp.group, pytest.approx(cp.weight_filler.std),
            pytest.approx(cp.bias_filler.value))


def test_alexnet_train_val_is_the_published_definition():
    net, by_name = _layers("bvlc_alexnet")
    assert net.name == "AlexNet"
    assert [lp.name for lp in filter_net(net, "TRAIN").layer] == ALEXNET_ORDER + ["loss"]
    assert [lp.name for lp in filter_net(net, "TEST").layer] == ALEXNET_ORDER + ["accuracy",
                                                                                 "loss"]
    for name, facts in ALEXNET_CONV.items():
        assert _conv_facts(by_name[name]) == facts, name
        assert [(p.lr_mult, p.decay_mult) for p in by_name[name].param] == [(1, 1), (2, 0)]
    for name, (n, std, bias) in ALEXNET_FC.items():
        ip = by_name[name].inner_product_param
        assert (ip.num_output, ip.weight_filler.type) == (n, "gaussian")
        assert ip.weight_filler.std == pytest.approx(std)
        assert ip.bias_filler.value == pytest.approx(bias)
    for name in ("norm1", "norm2"):
        lrn = by_name[name].lrn_param
        assert (lrn.local_size, lrn.beta) == (5, pytest.approx(0.75))
        assert lrn.alpha == pytest.approx(1e-4)
    for name in ("pool1", "pool2", "pool5"):
        pp = by_name[name].pooling_param
        assert (pp.pool, pp.kernel_size, pp.stride) == (caffe_pb2.PoolingParameter.MAX, 3, 2)
    for name in ("drop6", "drop7"):
        assert by_name[name].dropout_param.dropout_ratio == pytest.approx(0.5)
    train, test = (lp for lp in net.layer if lp.type == "Data")
    for lp, phase, mirror, batch, source in (
            (train, caffe_pb2.TRAIN, True, 256, "examples/imagenet/ilsvrc12_train_lmdb"),
            (test, caffe_pb2.TEST, False, 50, "examples/imagenet/ilsvrc12_val_lmdb")):
        assert lp.include[0].phase == phase
        assert (lp.transform_param.crop_size, lp.transform_param.mirror) == (CROP, mirror)
        assert lp.transform_param.mean_file == "data/ilsvrc12/imagenet_mean.binaryproto"
        assert (lp.data_param.source, lp.data_param.batch_size) == (source, batch)
        assert lp.data_param.backend == caffe_pb2.DataParameter.LMDB


def test_caffenet_pools_before_normalising():
    net, by_name = _layers("bvlc_reference_caffenet")
    assert net.name == "CaffeNet"
    assert [lp.name for lp in filter_net(net, "TRAIN").layer] == CAFFENET_ORDER + ["loss"]
    assert list(by_name["norm1"].bottom) == ["pool1"] and list(by_name["conv2"].bottom) == ["norm1"]
    assert by_name["conv2"].convolution_param.bias_filler.value == pytest.approx(1.0)


@pytest.mark.parametrize("model", BVLC)
def test_solver_is_the_published_recipe(model):
    s = read_solver_parameter(ZOO / model / "solver.prototxt")
    assert s.net == f"model/zoo/{model}/train_val.prototxt"
    assert (ZOO.parent.parent / s.net).is_file()
    assert (s.lr_policy, s.stepsize, s.max_iter, s.snapshot) == ("step", 100000, 450000, 10000)
    assert (list(s.test_iter), s.test_interval, s.display) == ([1000], 1000, 20)
    assert s.base_lr == pytest.approx(0.01) and s.gamma == pytest.approx(0.1)
    assert s.momentum == pytest.approx(0.9) and s.weight_decay == pytest.approx(0.0005)


@pytest.mark.parametrize("model", BVLC)
def test_parameter_count_and_deploy(model):
    shapes = {"data": (BATCH, 3, CROP, CROP)}
    train = Net.from_prototxt(ZOO / model / "train_val.prototxt", "TRAIN", input_shapes=shapes)
    assert train.param_count() == ALEXNET_PARAMS
    assert train.blob_shapes["pool5"] == (BATCH, 256, 6, 6)
    deploy = Net.from_prototxt(ZOO / model / "deploy.prototxt", "TEST")
    assert deploy.inputs[0].shapes == ((10, 3, CROP, CROP),)
    assert deploy.param_count() == ALEXNET_PARAMS
    assert deploy.output_names == ["prob"] and deploy.blob_shapes["prob"] == (10, 1000)
    assert [lp.name for lp in deploy.layers][1:] == [lp.name for lp in train.layers][1:-1] + ["prob"]


def test_alexnet_forward_backward_on_random_data():
    net = Net.from_prototxt(ZOO / "bvlc_alexnet" / "train_val.prototxt", "TRAIN",
                            input_shapes={"data": (BATCH, 3, CROP, CROP)})
    params = net.init(jax.random.PRNGKey(0))
    batch = net.random_batch(jax.random.PRNGKey(1), num_classes=1000)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b, r: net.apply(p, b, r, True)[1]))(
        params, batch, jax.random.PRNGKey(2))
    # Small initial weights: the softmax starts near uniform over 1000 classes.
    assert float(loss) == pytest.approx(math.log(1000), abs=0.5)
    for ref in net.learnable_params:
        g = np.asarray(grads[ref.layer][ref.index])
        assert g.shape == ref.shape and np.all(np.isfinite(g)), (ref.layer, ref.index)
    assert float(np.abs(np.asarray(grads["conv1"][0])).max()) > 0


def test_caffenet_deploy_forward_on_random_data():
    # Forward only: CaffeNet's backward uses the same layer types as AlexNet's, tested above,
    # and each XLA compile of a 61M-parameter net costs ~30 s on the 2-core machine.
    net = Net.from_prototxt(ZOO / "bvlc_reference_caffenet" / "deploy.prototxt", "TEST",
                            input_shapes={"data": (BATCH, 3, CROP, CROP)})
    params = net.init(jax.random.PRNGKey(0))
    tops, loss = jax.jit(lambda p, b: net.apply(p, b))(params,
                                                       net.random_batch(jax.random.PRNGKey(1)))
    prob = np.asarray(tops["prob"])
    assert prob.shape == (BATCH, 1000) and float(loss) == 0.0
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


def test_alexnet_mini_builds_and_learns():
    path = ZOO / "alexnet_mini" / "train_val.prototxt"
    net = Net.from_prototxt(path, "TRAIN", input_shapes={"data": (8, 3, 57, 57)})
    assert net.blob_shapes["pool5"] == (8, 32, 3, 3) and net.blob_shapes["fc8"] == (8, 10)
    assert net.param_count() == 66_794
    test = Net.from_prototxt(path, "TEST", input_shapes={"data": (5, 3, 57, 57)})
    assert test.output_names == ["accuracy", "loss"]
    solver = read_solver_parameter(ZOO / "alexnet_mini" / "solver.prototxt")
    assert solver.net == "model/zoo/alexnet_mini/train_val.prototxt"

    params = net.init(jax.random.PRNGKey(0))
    batch = net.random_batch(jax.random.PRNGKey(1), num_classes=10)

    @jax.jit
    def step(p, r):
        # Plain SGD on one fixed batch: the net must be able to fit it.
        loss, g = jax.value_and_grad(lambda q: net.apply(q, batch, r, True)[1])(p)
        return jax.tree_util.tree_map(lambda w, d: w - 0.01 * d, p, g), loss

    losses = []
    for i in range(12):
        params, loss = step(params, jax.random.PRNGKey(100 + i))
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
