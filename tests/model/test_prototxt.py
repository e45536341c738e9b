"""model/prototxt.py: text_format parsing, Caffe's upgrades (V0/V1/input), FilterNet rules, errors."""
from __future__ import annotations

import pytest

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.prototxt import (
    filter_net,
    parse_net_text,
    read_net_parameter,
    read_solver_parameter,
    state_meets_rule,
)

GOLDEN_TEST_LAYERS = [
    "data", "conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2", "conv3",
    "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "drop6", "fc7",
    "relu7", "drop7", "fc8", "loss", "accuracy", "accuracy_top5",
]


def test_golden_net_phases(golden):
    net = read_net_parameter(golden / "net.prototxt")
    assert net.name == "AlexMiniShared"
    assert len(net.layer) == 27  # two Data layers, one per phase
    test = filter_net(net, "TEST")
    assert [lp.name for lp in test.layer] == GOLDEN_TEST_LAYERS
    assert test.layer[0].data_param.source == "val_64_lmdb"
    train = filter_net(net, "TRAIN")
    assert [lp.name for lp in train.layer] == GOLDEN_TEST_LAYERS[:-2]
    assert train.layer[0].data_param.source == "train_64_lmdb"
    assert train.state.phase == caffe_pb2.TRAIN
    conv2 = train.layer[5]
    assert list(conv2.convolution_param.kernel_size) == [5] and conv2.convolution_param.group == 2
    assert [p.lr_mult for p in conv2.param] == [1, 2]


def test_golden_solver(golden):
    solver = read_solver_parameter(golden / "solver.prototxt")
    assert solver.net == "net.prototxt"
    assert solver.lr_policy == "step" and solver.stepsize == 8
    assert solver.base_lr == pytest.approx(0.01) and solver.momentum == pytest.approx(0.9)
    assert list(solver.test_iter) == [2] and solver.random_seed == 1701


V1_NET = """
name: "old"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  name: "conv"  type: CONVOLUTION  bottom: "data"  top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "shared_w"
  convolution_param { num_output: 4 kernel_size: 3 }
}
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers {
  name: "train_data" type: DATA top: "x" top: "y"
  include { phase: TRAIN }
  data_param { source: "lmdb" batch_size: 5 mean_file: "m.binaryproto" crop_size: 3 mirror: true }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "y" top: "loss" loss_weight: 2 }
"""


def test_v1_layers_and_input_dim_are_upgraded():
    net = parse_net_text(V1_NET, "old.prototxt")
    assert not net.layers and not net.input and not net.input_dim
    assert [lp.name for lp in net.layer] == ["input", "conv", "relu", "train_data", "loss"]
    assert [lp.type for lp in net.layer] == ["Input", "Convolution", "ReLU", "Data",
                                             "SoftmaxWithLoss"]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 8, 8]
    conv = net.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.param[0].name == "shared_w" and not conv.param[1].name
    assert conv.convolution_param.num_output == 4
    data = net.layer[3]
    # UpgradeNetDataTransformation: the transform fields move to transform_param.
    assert data.transform_param.mean_file == "m.binaryproto"
    assert data.transform_param.crop_size == 3 and data.transform_param.mirror
    assert not data.data_param.HasField("crop_size")
    assert data.include[0].phase == caffe_pb2.TRAIN
    assert list(net.layer[4].loss_weight) == [2]


def test_input_shape_is_upgraded():
    net = parse_net_text('input: "a" input_shape { dim: 1 dim: 3 } '
                         'input: "b" input_shape { dim: 1 }')
    assert net.layer[0].type == "Input" and list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 3], [1]]


def test_bad_input_dim_count_fails():
    with pytest.raises(ImagenetError, match="input_dim"):
        parse_net_text('input: "a" input_dim: 1 input_dim: 3', "x.prototxt")


V0_NET = """
name: "v0"
layers { layer { name: "data" type: "data" source: "db" batchsize: 4 cropsize: 5
                 meanfile: "mean" mirror: true } top: "data" top: "label" }
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 8 kernelsize: 3 stride: 2 group: 2
                 biasterm: false weight_filler { type: "gaussian" std: 0.01 }
                 blobs_lr: 1 weight_decay: 1 }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
         bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 }
         bottom: "pool1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 } bottom: "norm1" top: "fc" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" }
"""


def test_v0_nested_layers_and_padding_are_upgraded():
    net = parse_net_text(V0_NET, "v0.prototxt")
    assert [lp.name for lp in net.layer] == ["data", "conv1", "pool1", "norm1", "fc", "loss"]
    assert [lp.type for lp in net.layer] == ["Data", "Convolution", "Pooling", "LRN",
                                             "InnerProduct", "SoftmaxWithLoss"]
    data, conv, pool, lrn, fc, _ = net.layer
    assert data.data_param.source == "db" and data.data_param.batch_size == 4
    assert data.transform_param.crop_size == 5 and data.transform_param.mean_file == "mean"
    # UpgradeV0PaddingLayers: the padding layer disappears into the conv's pad.
    assert list(conv.bottom) == ["data"] and list(conv.convolution_param.pad) == [2]
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride), cp.group) == (8, [3], [2], 2)
    assert cp.bias_term is False and cp.weight_filler.std == pytest.approx(0.01)
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert lrn.lrn_param.local_size == 3 and lrn.lrn_param.alpha == pytest.approx(0.5)
    assert fc.inner_product_param.num_output == 10
    assert conv.param[0].lr_mult == 1


def test_parse_error_names_file_line_column_and_layer(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n'
                    "  convolution_param { num_outputs: 3 }\n}\n")
    with pytest.raises(ImagenetError) as info:
        read_net_parameter(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:5:")
    assert "num_outputs" in msg and "conv1" in msg


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ImagenetError, match="no such prototxt"):
        read_net_parameter(tmp_path / "nope.prototxt")


RULES_NET = """
layer { name: "always" type: "ReLU" }
layer { name: "train_only" type: "ReLU" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" exclude { phase: TEST } }
layer { name: "level2" type: "ReLU" include { min_level: 2 } }
layer { name: "upto1" type: "ReLU" include { max_level: 1 } }
layer { name: "staged" type: "ReLU" include { stage: "deploy" stage: "fast" } }
layer { name: "not_deploy" type: "ReLU" include { not_stage: "deploy" } }
layer { name: "either" type: "ReLU" include { phase: TEST } include { stage: "fast" } }
"""


@pytest.mark.parametrize("phase, level, stages, expected", [
    ("TRAIN", 0, (), ["always", "train_only", "not_test", "upto1", "not_deploy"]),
    ("TEST", 0, (), ["always", "upto1", "not_deploy", "either"]),
    ("TEST", 2, (), ["always", "level2", "not_deploy", "either"]),
    ("TRAIN", 0, ("deploy",), ["always", "train_only", "not_test", "upto1"]),
    ("TRAIN", 1, ("deploy", "fast"), ["always", "train_only", "not_test", "upto1", "staged",
                                      "either"]),
])
def test_filter_net_rules(phase, level, stages, expected):
    net = parse_net_text(RULES_NET)
    out = filter_net(net, phase, level=level, stages=stages)
    assert [lp.name for lp in out.layer] == expected
    assert list(out.state.stage) == list(stages) and out.state.level == level


def test_state_meets_rule_checks_every_condition():
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST, level=3, stage=["a"])
    assert state_meets_rule(state, caffe_pb2.NetStateRule(phase=caffe_pb2.TEST, min_level=3,
                                                          max_level=3, stage=["a"]))
    assert not state_meets_rule(state, caffe_pb2.NetStateRule(not_stage=["a"]))
    assert not state_meets_rule(state, caffe_pb2.NetStateRule(max_level=2))


def test_include_and_exclude_together_fail():
    net = parse_net_text('layer { name: "both" type: "ReLU" include { phase: TRAIN } '
                         'exclude { phase: TEST } }')
    with pytest.raises(ImagenetError, match="both"):
        filter_net(net, "TRAIN")


def test_unknown_phase_lists_valid():
    with pytest.raises(ImagenetError, match="TRAIN, TEST"):
        filter_net(parse_net_text(""), "VALIDATE")


def test_batchnorm_masking_params_are_dropped_and_learnable_ones_refused():
    net = parse_net_text('layer { name: "bn" type: "BatchNorm" param { lr_mult: 0 } '
                         'param { lr_mult: 0 } param { lr_mult: 0 } }')
    assert not net.layer[0].param
    with pytest.raises(ImagenetError, match="BatchNorm"):
        parse_net_text('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } '
                       'param { lr_mult: 0 } param { lr_mult: 0 } }')


NET_ERRORS = """name: "broken"
layer {
  name: "in"
  type: "Input"
  top: "x"
  input_param { shape { dim: 1 dim: 3 } }
}
layer {
  name: "mystery"
  type: "Frobnicate"
  bottom: "x"
  top: "y"
}
"""


def test_net_errors_name_file_line_and_layer(tmp_path):
    from model.net import Net

    path = tmp_path / "broken.prototxt"
    path.write_text(NET_ERRORS)
    with pytest.raises(ImagenetError) as info:
        Net.from_prototxt(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:9:") and "'mystery'" in msg
    assert "Frobnicate" in msg and "Convolution" in msg  # lists the supported types
    path.write_text(NET_ERRORS.replace('type: "Frobnicate"\n  bottom: "x"',
                                       'type: "ReLU"\n  bottom: "z"'))
    with pytest.raises(ImagenetError, match=r"broken.prototxt:9: layer 'mystery': unknown "
                                            r"bottom blob 'z'"):
        Net.from_prototxt(path)
    path.write_text(NET_ERRORS.replace('type: "Frobnicate"\n  bottom: "x"\n  top: "y"',
                                       'type: "Input"\n  top: "x"\n'
                                       '  input_param { shape { dim: 1 } }'))
    with pytest.raises(ImagenetError, match="multiple sources"):
        Net.from_prototxt(path)
