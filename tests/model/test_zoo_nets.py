"""model/zoo bvlc_googlenet and resnet_50: the committed prototxts are what model/zoo/build.py
writes, and they match the published definitions layer for layer (names, order, top shapes,
learnable value counts), by shape inference only: no full-size forward pass here (imagenet time
and benchmarks/zoo.py run them)."""
from __future__ import annotations

import math

import pytest

from data.proto import caffe_pb2
from model.net import Net
from model.prototxt import read_net_parameter, read_solver_parameter
from model.zoo import build

ZOO = build.ZOO
N = 2  # batch for shape inference
# Published learnable value counts. GoogLeNet deploy: 6,998,552 (the BVLC model); train_val adds
# the two auxiliary heads: 2 x (1x1 conv 512|528 -> 128, fc 2048 -> 1024, fc 1024 -> 1000).
GOOGLENET_DEPLOY_PARAMS = 6_998_552
GOOGLENET_AUX = [(512 * 128 + 128) + (2048 * 1024 + 1024) + (1024 * 1000 + 1000),
                 (528 * 128 + 128) + (2048 * 1024 + 1024) + (1024 * 1000 + 1000)]
# ResNet-50 (He et al.'s Caffe model): 25,557,032 in conv/fc weights, fc bias and BatchNorm's
# affine (here Scale's gamma and beta), + 64 for Caffe conv1's bias.
RESNET50_PARAMS = 25_557_032 + 64
RESNET50_BN_LAYERS = 53  # conv1 + 16 blocks x 3 + 4 projections
# Caffe's top shapes (C, H, W) of the published nets at 224x224 input (ceil-mode pooling).
GOOGLENET_TOPS = {
    "conv1/7x7_s2": (64, 112, 112), "pool1/3x3_s2": (64, 56, 56), "conv2/3x3": (192, 56, 56),
    "pool2/3x3_s2": (192, 28, 28), "inception_3a/output": (256, 28, 28),
    "inception_3b/output": (480, 28, 28), "pool3/3x3_s2": (480, 14, 14),
    "inception_4a/output": (512, 14, 14), "inception_4b/output": (512, 14, 14),
    "inception_4c/output": (512, 14, 14), "inception_4d/output": (528, 14, 14),
    "inception_4e/output": (832, 14, 14), "pool4/3x3_s2": (832, 7, 7),
    "inception_5a/output": (832, 7, 7), "inception_5b/output": (1024, 7, 7),
    "pool5/7x7_s1": (1024, 1, 1), "loss3/classifier": (1000,),
    "loss1/ave_pool": (512, 4, 4), "loss2/ave_pool": (528, 4, 4), "loss1/fc": (1024,),
}
RESNET50_TOPS = {
    "conv1": (64, 112, 112), "pool1": (64, 56, 56), "res2a_branch2a": (64, 56, 56),
    "res2c": (256, 56, 56), "res3a_branch2a": (128, 28, 28), "res3d": (512, 28, 28),
    "res4a": (1024, 14, 14), "res4f": (1024, 14, 14), "res5a_branch1": (2048, 7, 7),
    "res5c": (2048, 7, 7), "pool5": (2048, 1, 1), "fc1000": (1000,),
}
RESNET_STAGE_BLOCKS = {"2": "abc", "3": "abcd", "4": "abcdef", "5": "abc"}


def net(model: str, name: str, phase: str) -> Net:
    shapes = None if name == "deploy" else {"data": (N, 3, build.CROP, build.CROP)}
    return Net.from_prototxt(ZOO / model / f"{name}.prototxt", phase, input_shapes=shapes)



def test_committed_prototxts_are_what_build_writes() -> None:
    for path, text in build.files().items():
        assert path.read_text() == text, f"{path} is stale: run python -m model.zoo.build"


def test_googlenet_matches_the_published_definition() -> None:
    train, test = net("bvlc_googlenet", "train_val", "TRAIN"), net("bvlc_googlenet",
                                                                  "train_val", "TEST")
    deploy = net("bvlc_googlenet", "deploy", "TEST")
    assert deploy.param_count() == GOOGLENET_DEPLOY_PARAMS
    assert train.param_count() == GOOGLENET_DEPLOY_PARAMS + sum(GOOGLENET_AUX)
    assert deploy.inputs[0].shapes == ((10, 3, 224, 224),)
    for n, batch in ((train, N), (deploy, 10)):
        present = {b: s for b, s in GOOGLENET_TOPS.items() if b in n.blob_shapes}
        assert {b: n.blob_shapes[b] for b in present} == {b: (batch, *s) for b, s in
                                                         present.items()}
    assert len(present) == len(GOOGLENET_TOPS) - 3  # deploy lacks the auxiliary heads
    assert train.output_names == ["loss1/loss1", "loss2/loss2", "loss3/loss3"]
    assert [train.layer(f"loss{i}/loss" if i < 3 else "loss3/loss3").loss_weights[0]
            for i in (1, 2, 3)] == pytest.approx([0.3, 0.3, 1.0])
    assert sorted(test.output_names) == sorted(
        f"loss{i}/{k}" for i in (1, 2, 3) for k in (f"loss{i}", "top-1", "top-5"))
    assert deploy.output_names == ["prob"] and deploy.blob_shapes["prob"] == (10, 1000)
    # deploy = train_val's trunk, layer for layer, without data, auxiliary heads and losses
    trunk = [l.name for l in train.layers[1:] if not l.name.startswith(("loss1/", "loss2/"))]
    assert [l.name for l in deploy.layers[1:]] == trunk[:-1] + ["prob"]
    by_name = {l.name: l.param for l in train.layers}
    conv = by_name["inception_4e/5x5"].convolution_param
    assert (conv.num_output, conv.kernel_size[0], conv.pad[0]) == (128, 5, 2)
    assert conv.weight_filler.type == "xavier" and conv.bias_filler.value == pytest.approx(0.2)
    assert [(p.lr_mult, p.decay_mult) for p in by_name["inception_4e/5x5"].param] == [(1, 1),
                                                                                        (2, 0)]
    assert by_name["loss1/drop_fc"].dropout_param.dropout_ratio == pytest.approx(0.7)
    assert by_name["pool5/drop_7x7_s1"].dropout_param.dropout_ratio == pytest.approx(0.4)
    assert list(by_name["inception_3a/output"].bottom) == [
        "inception_3a/1x1", "inception_3a/3x3", "inception_3a/5x5", "inception_3a/pool_proj"]
    data = by_name["data"].transform_param
    assert (data.crop_size, data.mirror, list(data.mean_value)) == (224, True, [104, 117, 123])


def test_resnet50_matches_the_published_definition() -> None:
    train, test = net("resnet_50", "train_val", "TRAIN"), net("resnet_50", "train_val", "TEST")
    deploy = net("resnet_50", "deploy", "TEST")
    for n in (train, deploy):
        assert n.param_count() == RESNET50_PARAMS
        bn = [l for l in n.layers if l.type_name == "BatchNorm"]
        scale = sum(math.prod(r.shape) for r in n.learnable_params
                    if r.layer.startswith("scale"))
        assert len(bn) == RESNET50_BN_LAYERS
        # BatchNorm's stored statistics: mean and variance per channel + one factor per layer
        stats = sum(math.prod(r.shape) for r in n.learnable_params if not r.learnable)
        assert stats == scale + RESNET50_BN_LAYERS
    batch = deploy.inputs[0].shapes[0][0]
    assert batch == 1
    for n, b in ((train, N), (deploy, batch)):
        assert {t: n.blob_shapes[t] for t in RESNET50_TOPS} == {
            t: (b, *s) for t, s in RESNET50_TOPS.items()}
    names = [l.name for l in deploy.layers]
    for stage, letters in RESNET_STAGE_BLOCKS.items():
        assert [x for x in names if x.startswith(f"res{stage}") and x.endswith("_relu")
                and "branch" not in x] == [f"res{stage}{c}_relu" for c in letters]
    # published order of the first block: the projection (branch1) first, stride on 2a
    assert names[names.index("pool1") + 1:names.index("res2a") + 1] == [
        "res2a_branch1", "bn2a_branch1", "scale2a_branch1",
        "res2a_branch2a", "bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu",
        "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b", "res2a_branch2b_relu",
        "res2a_branch2c", "bn2a_branch2c", "scale2a_branch2c", "res2a"]
    by_name = {l.name: l.param for l in deploy.layers}
    assert by_name["res3a_branch2a"].convolution_param.stride[0] == 2
    assert not by_name["res3a_branch2b"].convolution_param.stride
    assert by_name["conv1"].convolution_param.bias_term
    assert not by_name["res4f_branch2c"].convolution_param.bias_term
    assert by_name["bn4f_branch2c"].batch_norm_param.use_global_stats
    assert not train.layer("bn4f_branch2c").param.batch_norm_param.HasField("use_global_stats")
    assert test.output_names == ["loss", "accuracy", "accuracy_top5"]
    assert deploy.output_names == ["prob"]


@pytest.mark.parametrize("model", ["bvlc_googlenet", "resnet_50"])
def test_solvers(model) -> None:
    s = read_solver_parameter(ZOO / model / "solver.prototxt")
    assert s.net == f"model/zoo/{model}/train_val.prototxt"
    assert (ZOO.parent.parent / s.net).is_file()
    if model == "bvlc_googlenet":  # as published
        assert (s.lr_policy, s.stepsize, s.max_iter, s.average_loss) == ("step", 320000,
                                                                         10_000_000, 40)
        assert s.gamma == pytest.approx(0.96) and s.weight_decay == pytest.approx(0.0002)
        assert not s.test_initialization
    else:  # He et al.: lr 0.1 / 10 at 150k, 300k, 450k; batch 32 x iter_size 8 = 256
        assert (s.lr_policy, list(s.stepvalue), s.max_iter, s.iter_size) == (
            "multistep", [150000, 300000, 450000], 600000, 8)
        assert s.base_lr == pytest.approx(0.1) and s.weight_decay == pytest.approx(1e-4)
    net_param = read_net_parameter(ZOO.parent.parent / s.net)
    assert all(l.data_param.backend == caffe_pb2.DataParameter.LMDB
               for l in net_param.layer if l.type == "Data")
