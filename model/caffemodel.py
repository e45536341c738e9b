"""`.caffemodel` files: binary NetParameter with blobs, read and written by layer name.

Reading accepts current (`layer`) and legacy (V1 `layers`, V0 nested) files through the same
upgrade as prototxt text (model/prototxt.py, Caffe's upgrade_proto.cpp). Writing is Caffe's
Net::ToProto + WriteProtoToBinaryFile (src/caffe/net.cpp): every layer of the net in order with
its full LayerParameter (phase set, loss layers with their implicit loss_weight 1), learnable
layers carrying blobs with new-style `shape` and `data` only. Copying weights into a net is
Net::CopyTrainedLayersFrom: by layer NAME, unknown source layers logged and ignored, any shape
mismatch fatal. Legacy 4-D blob shapes match a target whose shape, left-padded with ones to
4-D, is the same (Blob::ShapeEquals), e.g. old InnerProduct weights stored 1x1xOxI.

Where we are stricter than Caffe on purpose: Caffe scores or trains whatever a weights file
leaves out at its random initialisation without a word, so an empty file, or one cut short at
a layer boundary (a protobuf prefix of whole fields still parses), silently gives a random
model. Here an empty file or one without layers is refused when it is read, and
`check_coverage` refuses weights that leave a learnable layer out where the whole net must come
from the file (test, classify, resume) and, for finetuning, weights that match no learnable
layer or that are exactly the first layers of this very net (a file cut short).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import jax.numpy as jnp

from data.atomic import write_bytes_atomic
from data.datum import array_to_blobproto, blobproto_to_array, read_proto_file
from data.errors import ImagenetError
from data.proto import caffe_pb2
from model import prototxt
from model.net import Net, Params

# Blob::ShapeEquals compares legacy blobs as (num, channels, height, width).
LEGACY_AXES = 4
Weights = dict[str, list[np.ndarray]]


def read_net_binary(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a binary NetParameter file and upgrade it to the `layer` form; an empty file or
    one that holds no layer (what is left of a file cut after its name) is refused."""
    net = read_proto_file(path, caffe_pb2.NetParameter(), "caffemodel",
                          "caffemodel (NetParameter)")
    if net.ByteSize() == 0:
        raise ImagenetError(f"{path}: empty weights file (0 bytes of NetParameter): it holds "
                            "no weights; was it cut short or never written? use the complete "
                            ".caffemodel")
    net = prototxt.upgrade_net(net, str(Path(path)))
    if not net.layer:
        raise ImagenetError(f"{path}: holds no layers ({net.ByteSize()} bytes): not a "
                            "caffemodel, or one cut short; use the complete .caffemodel")
    return net


def load_caffemodel(path: str | Path) -> Weights:
    """{layer name: [blob arrays]} of a .caffemodel (V2 or V1), blobs in file shapes
    (legacy blobs 4-D); layers without blobs are included with an empty list."""
    net = read_net_binary(path)
    weights: Weights = {}
    for layer in net.layer:
        try:
            weights[layer.name] = [blobproto_to_array(b) for b in layer.blobs]
        except ImagenetError as exc:
            raise ImagenetError(f"{path}: layer {layer.name!r}: {exc}") from None
    return weights


def _layer_proto(net: Net, layer, params: Params | None) -> caffe_pb2.LayerParameter:
    lp = caffe_pb2.LayerParameter()
    lp.CopyFrom(layer.param)
    del lp.blobs[:]
    if not lp.HasField("phase"):
        lp.phase = prototxt.phase_value(net.phase)
    # LossLayer::LayerSetUp adds the implicit loss_weight 1 to its LayerParameter.
    if layer.is_loss and not lp.loss_weight:
        lp.loss_weight.extend(layer.loss_weights[:1])
    # BatchNormLayer::LayerSetUp masks its statistics with lr_mult 0 ParamSpecs.
    for i, spec in enumerate(layer.blobs):
        if i >= len(lp.param) and not spec.learnable:
            lp.param.add(lr_mult=0.0)
    if params is None:
        return lp
    for i, blob in enumerate(net.layer_blobs(params, layer)):
        lp.blobs.append(array_to_blobproto(np.asarray(blob, dtype=np.float32), legacy_4d=False))
    return lp


def net_to_proto(net: Net, params: Params | None, *, with_blobs: bool = True
                 ) -> caffe_pb2.NetParameter:
    """Net::ToProto (without diffs): name, then every layer with its parameters and blobs."""
    out = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layers:
        out.layer.append(_layer_proto(net, layer, params if with_blobs else None))
    return out


def save_caffemodel(path: str | Path, net: Net, params: Params) -> None:
    """Write a .caffemodel real Caffe reads (binary NetParameter), atomically."""
    write_bytes_atomic(path, net_to_proto(net, params).SerializeToString())


def _matching_array(src: np.ndarray, target: tuple[int, ...]) -> np.ndarray | None:
    if tuple(src.shape) == target:
        return src
    if src.ndim == LEGACY_AXES and len(target) <= LEGACY_AXES:
        padded = (1,) * (LEGACY_AXES - len(target)) + target
        if tuple(src.shape) == padded:
            return src.reshape(target)
    return None


def copy_layers(
    net: Net,
    params: Params,
    sources: Sequence[Mapping[str, Sequence[np.ndarray]]],
    log: Callable[[str], None] = print,
) -> Params:
    """Net::CopyTrainedLayersFrom for each source in order: a new params dict where every
    layer named in a source takes that source's blobs. Unknown source layers are logged as
    "Ignoring source layer <name>"; a blob count or shape mismatch raises ImagenetError."""
    out: Params = {name: list(blobs) for name, blobs in params.items()}
    for source in sources:
        for name, blobs in source.items():
            try:
                layer = net.layer(name)
            except ImagenetError:
                log(f"Ignoring source layer {name}")
                continue
            if len(blobs) != len(layer.blobs):
                raise ImagenetError(f"Incompatible number of blobs for layer {name}: source "
                                    f"has {len(blobs)}, target has {len(layer.blobs)}")
            for i, (src, spec) in enumerate(zip(blobs, layer.blobs)):
                target = tuple(int(d) for d in spec.shape)
                arr = _matching_array(np.asarray(src), target)
                if arr is None:
                    raise ImagenetError(
                        f"Cannot copy param {i} weights from layer '{name}'; shape mismatch. "
                        f"Source param shape is {_fmt(np.shape(src))}; target param shape is "
                        f"{_fmt(target)}. To learn this layer's parameters from scratch rather "
                        "than copying from a saved net, rename the layer.")
                owner_layer, owner_idx = net.param_owner(name, i)
                out[owner_layer][owner_idx] = jnp.asarray(arr, dtype=jnp.float32)
    return out


def layers_needing_weights(net: Net) -> list[str]:
    """The layers of `net` that own a parameter blob (shared blobs count for their owner)."""
    return [layer.name for layer in net.layers if any(
        net.param_owner(layer.name, i) == (layer.name, i) for i in range(len(layer.blobs)))]


def _names(names: Sequence[str], shown: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def check_coverage(net: Net, sources: Sequence[Mapping[str, Sequence[np.ndarray]]],
                   paths: Sequence[str | Path], *, whole_net: bool) -> list[str]:
    """Refuse weights that would leave layers at their random initialisation by accident.

    whole_net=True (test, classify, resume): every layer of `net` that owns parameters must be
    in some source. whole_net=False (finetuning, Caffe's --weights): at least one such layer
    must be, and no source may be exactly the first layers of `net` and stop short of a
    learnable one (a file cut at a layer boundary: renamed layers for finetuning leave the
    source's own layers after them). Returns the layers that stay at their fillers."""
    needing = layers_needing_weights(net)
    given = list(dict.fromkeys(name for source in sources for name in source))
    missing = [name for name in needing if name not in given]
    where = ", ".join(str(p) for p in paths)
    if not missing:
        return []
    if whole_net:
        raise ImagenetError(
            f"{where} has no weights for layer(s) {_names(missing)} of net {net.name!r}, which "
            "would be used at their random initialisation; it holds "
            f"{_names(given or ['no layer'])}: is it cut short, or a model of another net?")
    if len(missing) == len(needing):
        raise ImagenetError(
            f"{where} has weights for none of the {len(needing)} learnable layers of net "
            f"{net.name!r} ({_names(needing)}); it holds {_names(given)}, so nothing "
            "would be copied: is it a model of this net?")
    order = [layer.name for layer in net.layers]
    for source, path in zip(sources, paths):
        names = list(source)
        cut = len(names)
        if names == order[:cut] and any(n in missing for n in order[cut:]):
            raise ImagenetError(
                f"{path} holds only the first {cut} of the {len(order)} layers of net "
                f"{net.name!r} (the last one {names[-1]!r}): it looks cut short, and "
                f"{_names([n for n in missing if n in order[cut:]])} would train from their "
                "random initialisation; use the complete .caffemodel")
    return missing


def _fmt(shape: Sequence[int]) -> str:
    # Blob::shape_string: "16 3 11 11 (5808)".
    dims = [int(d) for d in shape]
    return f"{' '.join(map(str, dims))} ({int(np.prod(dims)) if dims else 1})"


__all__ = ["check_coverage", "copy_layers", "layers_needing_weights", "load_caffemodel",
           "net_to_proto", "read_net_binary", "save_caffemodel"]
