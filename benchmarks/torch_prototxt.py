"""A plain-PyTorch twin of a Caffe net, built from the same prototxt, for speed comparisons.

Runs the layers of the TRAIN phase in prototxt order on a dict of blobs, as Caffe's Net does,
with the shapes Caffe gives them: Convolution (groups, bias_term), Pooling MAX/AVE in ceil mode
(global_pooling too), LRN ACROSS_CHANNELS as a shift-sum (PyTorch's LocalResponseNorm is several
times slower on CPU: docs/MACHINE_NOTES.md), ReLU, Dropout, Concat, Eltwise SUM/PROD/MAX,
InnerProduct, BatchNorm (batch statistics in TRAIN, no affine: Caffe's) + Scale, Softmax,
SoftmaxWithLoss (mean over the batch) with loss_weight (the TRAIN net has no Accuracy). Weights get
PyTorch's default initialisation: this twin is for timing, its numbers are not Caffe's.
torch is imported by the caller: the project never depends on it.
"""
from __future__ import annotations

from typing import Any

from data.proto import caffe_pb2

# Layer types the twin implements; anything else is refused with the list.
SUPPORTED = ("Input", "Data", "Convolution", "Pooling", "LRN", "ReLU", "Dropout", "Concat",
             "Eltwise", "InnerProduct", "BatchNorm", "Scale", "Softmax", "SoftmaxWithLoss")


def _one(values, default: int) -> int:
    return int(values[0]) if len(values) else default


def build(torch: Any, net: caffe_pb2.NetParameter, shapes: dict[str, tuple[int, ...]]) -> Any:
    """An nn.Module whose forward(**inputs) returns the weighted loss sum (Caffe's loss).

    `net` is the phase-filtered NetParameter and `shapes` its blob shapes as this project's Net
    computes them (Caffe's), which size the modules."""
    nn = torch.nn
    modules = nn.ModuleDict()
    steps: list[tuple[caffe_pb2.LayerParameter, Any]] = []
    for lp in net.layer:
        if lp.type not in SUPPORTED:
            raise ValueError(f"layer {lp.name!r}: type {lp.type!r} not in the PyTorch twin "
                             f"({', '.join(SUPPORTED)})")
        key = f"l{len(steps)}"
        bottom = [shapes[b] for b in lp.bottom]
        mod = None
        if lp.type == "Convolution":
            cp = lp.convolution_param
            mod = nn.Conv2d(bottom[0][1], cp.num_output, _one(cp.kernel_size, 1),
                            stride=_one(cp.stride, 1), padding=_one(cp.pad, 0),
                            groups=cp.group, bias=cp.bias_term)
        elif lp.type == "InnerProduct":
            n_in = 1
            for d in bottom[0][1:]:
                n_in *= d
            mod = nn.Linear(n_in, lp.inner_product_param.num_output,
                            bias=lp.inner_product_param.bias_term)
        elif lp.type == "Scale":
            c = bottom[0][1]
            mod = nn.Module()
            mod.weight = nn.Parameter(torch.ones(1, c, 1, 1))
            mod.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        elif lp.type == "BatchNorm":
            mod = nn.BatchNorm2d(bottom[0][1], eps=lp.batch_norm_param.eps,
                                 momentum=1 - lp.batch_norm_param.moving_average_fraction,
                                 affine=False)
        if mod is not None:
            modules[key] = mod
        steps.append((lp, key))

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = modules

        def forward(self, **inputs):
            blobs = dict(inputs)
            loss = 0.0
            for lp, key in steps:
                if lp.type in ("Input", "Data"):
                    continue
                mod = self.layers[key] if key in self.layers else None
                outs = _apply(torch, lp, mod, [blobs[b] for b in lp.bottom])
                for top, out in zip(lp.top, outs):
                    blobs[top] = out
                if lp.type == "SoftmaxWithLoss":
                    weight = lp.loss_weight[0] if lp.loss_weight else 1.0
                    loss = loss + weight * outs[0]
            return loss

    return Twin()


def _apply(torch: Any, lp: caffe_pb2.LayerParameter, mod: Any, x: list[Any]) -> list[Any]:
    F = torch.nn.functional
    t = lp.type
    if t in ("Input", "Data"):
        return list(x)
    if t == "Convolution":
        return [F.conv2d(x[0], mod.weight, mod.bias, mod.stride, mod.padding, 1, mod.groups)]
    if t == "Pooling":
        pp = lp.pooling_param
        if pp.global_pooling:
            k, s, p = tuple(x[0].shape[2:]), 1, 0
        else:
            k, s, p = pp.kernel_size, pp.stride or 1, pp.pad
        if pp.pool == caffe_pb2.PoolingParameter.MAX:
            return [F.max_pool2d(x[0], k, s, p, ceil_mode=True)]
        return [F.avg_pool2d(x[0], k, s, p, ceil_mode=True)]
    if t == "LRN":
        rp = lp.lrn_param
        sq = x[0] * x[0]
        half = rp.local_size // 2
        padded = F.pad(sq, (0, 0, 0, 0, half, half))
        c = x[0].shape[1]
        acc = padded[:, 0:c]
        for i in range(1, rp.local_size):
            acc = acc + padded[:, i:i + c]
        return [x[0] * (rp.k + (rp.alpha / rp.local_size) * acc).pow(-rp.beta)]
    if t == "ReLU":
        return [F.relu(x[0])]
    if t == "Dropout":
        return [F.dropout(x[0], lp.dropout_param.dropout_ratio, training=True)]
    if t == "Concat":
        return [torch.cat(x, dim=lp.concat_param.axis)]
    if t == "Eltwise":
        ep = lp.eltwise_param
        if ep.operation == caffe_pb2.EltwiseParameter.PROD:
            out = x[0]
            for y in x[1:]:
                out = out * y
            return [out]
        if ep.operation == caffe_pb2.EltwiseParameter.MAX:
            out = x[0]
            for y in x[1:]:
                out = torch.maximum(out, y)
            return [out]
        coeffs = list(ep.coeff) or [1.0] * len(x)
        out = coeffs[0] * x[0]
        for c, y in zip(coeffs[1:], x[1:]):
            out = out + c * y
        return [out]
    if t == "InnerProduct":
        return [F.linear(x[0].flatten(1), mod.weight, mod.bias)]
    if t == "BatchNorm":
        return [mod(x[0])]
    if t == "Scale":
        return [x[0] * mod.weight + mod.bias]
    if t == "Softmax":
        return [F.softmax(x[0], dim=1)]
    if t == "SoftmaxWithLoss":
        return [F.cross_entropy(x[0], x[1].long())]
    raise ValueError(f"layer {lp.name!r}: type {t!r} not in the twin")
