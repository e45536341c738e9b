"""Writes the zoo's GoogLeNet and ResNet-50 prototxts from the compact descriptions below.

`python -m model.zoo.build` rewrites model/zoo/bvlc_googlenet/{train_val,deploy,solver}.prototxt
and model/zoo/resnet_50/{train_val,deploy,solver}.prototxt; tests/model/test_zoo_nets.py checks
that the committed files are what this module writes and that the nets have the published top
shapes and learnable value counts.

The facts reproduced (layer names, order, hyperparameters) are those of the published
definitions: BVLC/caffe models/bvlc_googlenet/{train_val,deploy,solver}.prototxt (Szegedy et al.
2014, as trained by BVLC: three loss heads weighted 0.3/0.3/1, xavier fillers, biases 0.2) and
KaimingHe/deep-residual-networks prototxt/ResNet-50-deploy.prototxt (He et al. 2015: "v1" blocks
with the stride on the first 1x1 convolution, projection shortcuts "branch1" declared first,
BatchNorm + Scale after every convolution, convolutions without bias except conv1). He et al.
published no Caffe train_val or solver: ours follow the paper (SGD, batch 256 = 32 x iter_size 8,
lr 0.1 divided by 10 three times, momentum 0.9, weight decay 1e-4, 600k iterations, msra
fillers, BatchNorm in batch mode for TRAIN and on stored statistics for TEST by Caffe's phase
default), with the project's usual Data layers (the ImageNet LMDBs and mean of
examples/imagenet).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from data.proto import caffe_pb2

ZOO = Path(__file__).resolve().parent
TRAIN_LMDB = "examples/imagenet/ilsvrc12_train_lmdb"
VAL_LMDB = "examples/imagenet/ilsvrc12_val_lmdb"
IMAGENET_MEAN = "data/ilsvrc12/imagenet_mean.binaryproto"
NUM_CLASSES = 1000
CROP = 224
TOP5 = 5

# bvlc_googlenet: mean values, batch sizes, fillers, LRN and dropout settings.
GOOGLENET_MEAN_BGR = (104, 117, 123)
GOOGLENET_TRAIN_BATCH = 32
GOOGLENET_TEST_BATCH = 50
GOOGLENET_DEPLOY_BATCH = 10
GOOGLENET_BIAS = 0.2
LRN_SIZE, LRN_ALPHA, LRN_BETA = 5, 0.0001, 0.75
AUX_DROPOUT, MAIN_DROPOUT = 0.7, 0.4
AUX_LOSS_WEIGHT = 0.3
AUX_CONV, AUX_FC = 128, 1024
# Inception modules: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), Table 1 of the
# GoogLeNet paper, in network order; a "pool" entry is a 3x3 stride-2 max pooling.
INCEPTION: tuple[tuple[str, tuple[int, int, int, int, int, int] | None], ...] = (
    ("inception_3a", (64, 96, 128, 16, 32, 32)),
    ("inception_3b", (128, 128, 192, 32, 96, 64)),
    ("pool3/3x3_s2", None),
    ("inception_4a", (192, 96, 208, 16, 48, 64)),
    ("inception_4b", (160, 112, 224, 24, 64, 64)),
    ("inception_4c", (128, 128, 256, 24, 64, 64)),
    ("inception_4d", (112, 144, 288, 32, 64, 64)),
    ("inception_4e", (256, 160, 320, 32, 128, 128)),
    ("pool4/3x3_s2", None),
    ("inception_5a", (256, 160, 320, 32, 128, 128)),
    ("inception_5b", (384, 192, 384, 48, 128, 128)),
)
# The auxiliary classifiers sit on these modules' outputs (TRAIN/TEST only, not in deploy).
AUX_HEADS = {"inception_4a": "loss1", "inception_4d": "loss2"}

# ResNet-50: (stage, blocks, bottleneck width, output width, first block's stride).
RESNET50_STAGES = ((2, 3, 64, 256, 1), (3, 4, 128, 512, 2), (4, 6, 256, 1024, 2),
                   (5, 3, 512, 2048, 2))
RESNET_TRAIN_BATCH = 32
RESNET_TEST_BATCH = 50
RESNET_DEPLOY_BATCH = 1
RESNET_FC_STD = 0.01


@dataclass(frozen=True)
class Params:
    """ParamSpecs of a layer's weights and bias: (lr_mult, decay_mult) pairs."""

    specs: tuple[tuple[float, float], ...] = ()


BVLC_PARAMS = Params(((1, 1), (2, 0)))
NO_PARAMS = Params()


class NetBuilder:
    """Appends layers to a NetParameter; each helper returns the name of its top blob."""

    def __init__(self, name: str) -> None:
        self.net = caffe_pb2.NetParameter(name=name)

    def layer(self, name: str, type_: str, bottoms: list[str], tops: list[str], *,
              params: Params = NO_PARAMS, phase: int | None = None) -> caffe_pb2.LayerParameter:
        lp = self.net.layer.add(name=name, type=type_)
        lp.bottom.extend(bottoms)
        lp.top.extend(tops)
        for lr, decay in params.specs:
            lp.param.add(lr_mult=lr, decay_mult=decay)
        if phase is not None:
            lp.include.add(phase=phase)
        return lp

    def data(self, phase: int, source: str, batch: int, *, mirror: bool,
             mean_values: tuple[int, ...] = (), mean_file: str = "") -> None:
        lp = self.layer("data", "Data", [], ["data", "label"], phase=phase)
        lp.transform_param.mirror = mirror
        lp.transform_param.crop_size = CROP
        if mean_file:
            lp.transform_param.mean_file = mean_file
        lp.transform_param.mean_value.extend(mean_values)
        lp.data_param.source = source
        lp.data_param.batch_size = batch
        lp.data_param.backend = caffe_pb2.DataParameter.LMDB

    def input(self, batch: int) -> None:
        lp = self.layer("data", "Input", [], ["data"])
        lp.input_param.shape.add().dim.extend([batch, 3, CROP, CROP])

    def inputs(self, deploy: bool, batches: tuple[int, int, int], *,
               mean_values: tuple[int, ...] = (), mean_file: str = "") -> None:
        """deploy: an Input of batches[0]; else TRAIN (mirrored) and TEST Data layers of
        batches[1] and batches[2] on the ImageNet LMDBs."""
        if deploy:
            self.input(batches[0])
            return
        self.data(caffe_pb2.TRAIN, TRAIN_LMDB, batches[1], mirror=True,
                  mean_values=mean_values, mean_file=mean_file)
        self.data(caffe_pb2.TEST, VAL_LMDB, batches[2], mirror=False,
                  mean_values=mean_values, mean_file=mean_file)

    def conv(self, name: str, bottom: str, num_output: int, kernel: int, *, stride: int = 1,
             pad: int = 0, top: str | None = None, bias: float | None = 0.0,
             weight_filler: str = "xavier", params: Params = NO_PARAMS) -> str:
        """Convolution; bias None means bias_term: false."""
        top = top or name
        lp = self.layer(name, "Convolution", [bottom], [top], params=params)
        cp = lp.convolution_param
        cp.num_output = num_output
        if bias is None:
            cp.bias_term = False
        if pad:
            cp.pad.append(pad)
        cp.kernel_size.append(kernel)
        if stride != 1:
            cp.stride.append(stride)
        cp.weight_filler.type = weight_filler
        if bias is not None:
            cp.bias_filler.type = "constant"
            cp.bias_filler.value = bias
        return top

    def relu(self, name: str, blob: str) -> str:
        self.layer(name, "ReLU", [blob], [blob])
        return blob

    def pool(self, name: str, bottom: str, kind: int, kernel: int, stride: int,
             pad: int = 0) -> str:
        pp = self.layer(name, "Pooling", [bottom], [name]).pooling_param
        pp.pool = kind
        pp.kernel_size = kernel
        pp.stride = stride
        if pad:
            pp.pad = pad
        return name

    def lrn(self, name: str, bottom: str) -> str:
        p = self.layer(name, "LRN", [bottom], [name]).lrn_param
        p.local_size, p.alpha, p.beta = LRN_SIZE, LRN_ALPHA, LRN_BETA
        return name

    def dropout(self, name: str, blob: str, ratio: float) -> str:
        self.layer(name, "Dropout", [blob], [blob]).dropout_param.dropout_ratio = ratio
        return blob

    def fc(self, name: str, bottom: str, num_output: int, *, weight_filler: str = "xavier",
           std: float = 0.0, bias: float = 0.0, params: Params = BVLC_PARAMS) -> str:
        ip = self.layer(name, "InnerProduct", [bottom], [name], params=params).inner_product_param
        ip.num_output = num_output
        ip.weight_filler.type = weight_filler
        if std:
            ip.weight_filler.std = std
        ip.bias_filler.type = "constant"
        ip.bias_filler.value = bias
        return name

    def losses(self, prefix: str, scores: str, loss_name: str, loss_top: str,
               weight: float | None, accuracy_tops: tuple[str, str]) -> None:
        """SoftmaxWithLoss on `scores` plus top-1 and top-5 Accuracy in TEST."""
        lp = self.layer(loss_name, "SoftmaxWithLoss", [scores, "label"], [loss_top])
        if weight is not None:
            lp.loss_weight.append(weight)
        top1, top5 = accuracy_tops
        self.layer(top1, "Accuracy", [scores, "label"], [top1], phase=caffe_pb2.TEST)
        acc = self.layer(top5, "Accuracy", [scores, "label"], [top5], phase=caffe_pb2.TEST)
        acc.accuracy_param.top_k = TOP5

    def text(self) -> str:
        return text_format.MessageToString(self.net)


# ----------------------------------------------------------------------------- GoogLeNet

def _googlenet_conv(b: NetBuilder, name: str, bottom: str, n: int, k: int, *, stride: int = 1,
                    pad: int = 0, relu: str) -> str:
    top = b.conv(name, bottom, n, k, stride=stride, pad=pad, bias=GOOGLENET_BIAS,
                 params=BVLC_PARAMS)
    return b.relu(relu, top)


def _inception(b: NetBuilder, name: str, bottom: str,
               widths: tuple[int, int, int, int, int, int]) -> str:
    n1, n3r, n3, n5r, n5, npool = widths
    one = _googlenet_conv(b, f"{name}/1x1", bottom, n1, 1, relu=f"{name}/relu_1x1")
    r3 = _googlenet_conv(b, f"{name}/3x3_reduce", bottom, n3r, 1,
                         relu=f"{name}/relu_3x3_reduce")
    three = _googlenet_conv(b, f"{name}/3x3", r3, n3, 3, pad=1, relu=f"{name}/relu_3x3")
    r5 = _googlenet_conv(b, f"{name}/5x5_reduce", bottom, n5r, 1,
                         relu=f"{name}/relu_5x5_reduce")
    five = _googlenet_conv(b, f"{name}/5x5", r5, n5, 5, pad=2, relu=f"{name}/relu_5x5")
    pooled = b.pool(f"{name}/pool", bottom, caffe_pb2.PoolingParameter.MAX, 3, 1, pad=1)
    proj = _googlenet_conv(b, f"{name}/pool_proj", pooled, npool, 1,
                           relu=f"{name}/relu_pool_proj")
    out = f"{name}/output"
    b.layer(out, "Concat", [one, three, five, proj], [out])
    return out


def _aux_head(b: NetBuilder, head: str, bottom: str) -> None:
    """GoogLeNet's auxiliary classifier: 5x5/3 average pool, 1x1 conv, fc, dropout, fc."""
    pooled = b.pool(f"{head}/ave_pool", bottom, caffe_pb2.PoolingParameter.AVE, 5, 3)
    conv = _googlenet_conv(b, f"{head}/conv", pooled, AUX_CONV, 1, relu=f"{head}/relu_conv")
    fc = b.fc(f"{head}/fc", conv, AUX_FC, bias=GOOGLENET_BIAS)
    b.relu(f"{head}/relu_fc", fc)
    b.dropout(f"{head}/drop_fc", fc, AUX_DROPOUT)
    scores = b.fc(f"{head}/classifier", fc, NUM_CLASSES)
    b.losses(head, scores, f"{head}/loss", f"{head}/{head}", AUX_LOSS_WEIGHT,
             (f"{head}/top-1", f"{head}/top-5"))


def googlenet(deploy: bool) -> str:
    """bvlc_googlenet train_val (deploy=False) or deploy prototxt text."""
    b = NetBuilder("GoogleNet")
    b.inputs(deploy, (GOOGLENET_DEPLOY_BATCH, GOOGLENET_TRAIN_BATCH, GOOGLENET_TEST_BATCH),
             mean_values=GOOGLENET_MEAN_BGR)
    x = _googlenet_conv(b, "conv1/7x7_s2", "data", 64, 7, stride=2, pad=3,
                        relu="conv1/relu_7x7")
    x = b.pool("pool1/3x3_s2", x, caffe_pb2.PoolingParameter.MAX, 3, 2)
    x = b.lrn("pool1/norm1", x)
    x = _googlenet_conv(b, "conv2/3x3_reduce", x, 64, 1, relu="conv2/relu_3x3_reduce")
    x = _googlenet_conv(b, "conv2/3x3", x, 192, 3, pad=1, relu="conv2/relu_3x3")
    x = b.lrn("conv2/norm2", x)
    x = b.pool("pool2/3x3_s2", x, caffe_pb2.PoolingParameter.MAX, 3, 2)
    for name, widths in INCEPTION:
        if widths is None:
            x = b.pool(name, x, caffe_pb2.PoolingParameter.MAX, 3, 2)
            continue
        x = _inception(b, name, x, widths)
        if name in AUX_HEADS and not deploy:
            _aux_head(b, AUX_HEADS[name], x)
    x = b.pool("pool5/7x7_s1", x, caffe_pb2.PoolingParameter.AVE, 7, 1)
    b.dropout("pool5/drop_7x7_s1", x, MAIN_DROPOUT)
    scores = b.fc("loss3/classifier", x, NUM_CLASSES)
    if deploy:
        b.layer("prob", "Softmax", [scores], ["prob"])
    else:
        b.losses("loss3", scores, "loss3/loss3", "loss3/loss3", 1.0,
                 ("loss3/top-1", "loss3/top-5"))
    return b.text()


GOOGLENET_SOLVER = """\
net: "model/zoo/bvlc_googlenet/train_val.prototxt"
test_iter: 1000
test_interval: 4000
test_initialization: false
display: 40
average_loss: 40
base_lr: 0.01
lr_policy: "step"
stepsize: 320000
gamma: 0.96
max_iter: 10000000
momentum: 0.9
weight_decay: 0.0002
snapshot: 40000
snapshot_prefix: "models/bvlc_googlenet/bvlc_googlenet"
solver_mode: GPU
"""


# ----------------------------------------------------------------------------- ResNet-50

def _conv_bn(b: NetBuilder, conv: str, bn: str, scale: str, bottom: str, n: int, k: int, *,
             stride: int = 1, pad: int = 0, deploy: bool, bias: float | None = None) -> str:
    """Convolution + BatchNorm + Scale, all in place after the convolution (He et al.)."""
    top = b.conv(conv, bottom, n, k, stride=stride, pad=pad, bias=bias, weight_filler="msra")
    lp = b.layer(bn, "BatchNorm", [top], [top])
    if deploy:
        lp.batch_norm_param.use_global_stats = True
    b.layer(scale, "Scale", [top], [top]).scale_param.bias_term = True
    return top


def _bottleneck(b: NetBuilder, stage: int, letter: str, bottom: str, width: int, out: int,
                stride: int, projection: bool, deploy: bool) -> str:
    name = f"{stage}{letter}"
    if projection:
        shortcut = _conv_bn(b, f"res{name}_branch1", f"bn{name}_branch1",
                            f"scale{name}_branch1", bottom, out, 1, stride=stride, deploy=deploy)
    else:
        shortcut = bottom
    x = _conv_bn(b, f"res{name}_branch2a", f"bn{name}_branch2a", f"scale{name}_branch2a",
                 bottom, width, 1, stride=stride, deploy=deploy)
    b.relu(f"res{name}_branch2a_relu", x)
    x = _conv_bn(b, f"res{name}_branch2b", f"bn{name}_branch2b", f"scale{name}_branch2b",
                 x, width, 3, pad=1, deploy=deploy)
    b.relu(f"res{name}_branch2b_relu", x)
    x = _conv_bn(b, f"res{name}_branch2c", f"bn{name}_branch2c", f"scale{name}_branch2c",
                 x, out, 1, deploy=deploy)
    b.layer(f"res{name}", "Eltwise", [shortcut, x], [f"res{name}"])
    return b.relu(f"res{name}_relu", f"res{name}")


def resnet50(deploy: bool) -> str:
    """ResNet-50 train_val (deploy=False) or deploy prototxt text."""
    b = NetBuilder("ResNet-50")
    b.inputs(deploy, (RESNET_DEPLOY_BATCH, RESNET_TRAIN_BATCH, RESNET_TEST_BATCH),
             mean_file=IMAGENET_MEAN)
    x = _conv_bn(b, "conv1", "bn_conv1", "scale_conv1", "data", 64, 7, stride=2, pad=3,
                 deploy=deploy, bias=0.0)
    b.relu("conv1_relu", x)
    x = b.pool("pool1", x, caffe_pb2.PoolingParameter.MAX, 3, 2)
    for stage, blocks, width, out, stride in RESNET50_STAGES:
        for i in range(blocks):
            letter = chr(ord("a") + i)
            x = _bottleneck(b, stage, letter, x, width, out, stride if i == 0 else 1,
                            projection=(i == 0), deploy=deploy)
    x = b.pool("pool5", x, caffe_pb2.PoolingParameter.AVE, 7, 1)
    scores = b.fc("fc1000", x, NUM_CLASSES, weight_filler="gaussian", std=RESNET_FC_STD)
    if deploy:
        b.layer("prob", "Softmax", [scores], ["prob"])
    else:
        b.losses("loss", scores, "loss", "loss", None, ("accuracy", "accuracy_top5"))
    return b.text()


RESNET50_SOLVER = """\
net: "model/zoo/resnet_50/train_val.prototxt"
test_iter: 1000
test_interval: 10000
display: 20
average_loss: 20
base_lr: 0.1
lr_policy: "multistep"
gamma: 0.1
stepvalue: 150000
stepvalue: 300000
stepvalue: 450000
max_iter: 600000
iter_size: 8
momentum: 0.9
weight_decay: 0.0001
snapshot: 10000
snapshot_prefix: "models/resnet_50/resnet_50"
solver_mode: GPU
"""


def files() -> dict[Path, str]:
    """Every file this module writes, by path."""
    return {
        ZOO / "bvlc_googlenet" / "train_val.prototxt": googlenet(deploy=False),
        ZOO / "bvlc_googlenet" / "deploy.prototxt": googlenet(deploy=True),
        ZOO / "bvlc_googlenet" / "solver.prototxt": GOOGLENET_SOLVER,
        ZOO / "resnet_50" / "train_val.prototxt": resnet50(deploy=False),
        ZOO / "resnet_50" / "deploy.prototxt": resnet50(deploy=True),
        ZOO / "resnet_50" / "solver.prototxt": RESNET50_SOLVER,
    }


def main() -> None:
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
