"""Reading Caffe's text prototxt files (nets and solvers) and choosing a phase's layers.

Parsing is protobuf's own `text_format` over our schema (data/proto/caffe.proto); nothing here
parses text by hand. After parsing, old nets are upgraded the way Caffe's
src/caffe/util/upgrade_proto.cpp does it, so the rest of the code only ever sees the current
`layer { type: "Convolution" ... }` form:

  V0 (`layers { layer { type: "conv" ... } }`, with separate "padding" layers) -> V1,
  V1 (`layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 }`)              -> `layer`,
  V1 data layers carrying scale/mean_file/crop_size/mirror in data_param      -> transform_param,
  net-level `input` / `input_dim` / `input_shape`                             -> an "Input" layer,
  BatchNorm layers with the three lr_mult 0 ParamSpecs of old prototxts       -> no ParamSpecs.

`filter_net` is Caffe's Net::FilterNet / Net::StateMeetsRule (src/caffe/net.cpp): it keeps the
layers whose include/exclude rules match a phase, level and stages.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2

PHASES: dict[str, int] = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}

# upgrade_proto.cpp UpgradeV1LayerType: V1 enum name -> layer type string.
V1_TYPE_NAMES: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# upgrade_proto.cpp UpgradeV0LayerType: V0 type string -> V1 enum name.
V0_TYPE_NAMES: dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

# Per-layer parameter messages V1LayerParameter shares with LayerParameter (same names).
_V1_SHARED_PARAMS: tuple[str, ...] = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param", "eltwise_param",
    "exp_param", "hdf5_data_param", "hdf5_output_param", "hinge_loss_param",
    "image_data_param", "infogain_loss_param", "inner_product_param", "lrn_param",
    "memory_data_param", "mvn_param", "pooling_param", "power_param", "relu_param",
    "sigmoid_param", "softmax_param", "slice_param", "tanh_param", "threshold_param",
    "window_data_param", "transform_param", "loss_param",
)

# upgrade_proto.cpp UpgradeNetDataTransformation: data-layer fields that moved to transform_param.
_DATA_PARAMS_WITH_TRANSFORM: tuple[str, ...] = ("data_param", "image_data_param",
                                                "window_data_param")
_TRANSFORM_FIELDS: tuple[str, ...] = ("scale", "mean_file", "crop_size", "mirror")

# Legacy `input_dim` gives 4 numbers (N, C, H, W) per input.
_LEGACY_INPUT_DIMS = 4
# BatchNorm's three statistics blobs; old prototxts masked them with three lr_mult 0 specs.
_BATCHNORM_BLOBS = 3

_LINE_COL = re.compile(r"^(?:.*?:)?(\d+):(\d+)\s*:\s*(.*)$", re.S)
_NAME_FIELD = re.compile(r'^\s*name\s*:\s*"([^"]*)"')


# ---------------------------------------------------------------- reading


def _read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ImagenetError(f"{p}: no such prototxt file") from None
    except UnicodeDecodeError as exc:
        raise ImagenetError(f"{p}: not a text prototxt ({exc})") from None


def _enclosing_layer_name(lines: Sequence[str], line_no: int) -> str | None:
    """The `name:` of the innermost layer block at or above 1-based line_no (best effort:
    the nearest `name: "..."` line at or before the error)."""
    for i in range(min(line_no, len(lines)) - 1, -1, -1):
        m = _NAME_FIELD.match(lines[i])
        if m:
            return m.group(1)
    return None


def _parse_text(text: str, message, path: str | Path) -> None:
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raw = str(exc)
        m = _LINE_COL.match(raw)
        if m:
            line, col, what = int(m.group(1)), int(m.group(2)), m.group(3)
            layer = _enclosing_layer_name(text.splitlines(), line)
            where = f" (in layer {layer!r})" if layer else ""
            raise ImagenetError(f"{path}:{line}:{col}: {what}{where}") from None
        raise ImagenetError(f"{path}: {raw}") from None
    _refuse_nul(message, path)


def _refuse_nul(message, path: str | Path, prefix: str = "", layer: str | None = None) -> None:
    """No string field may hold a NUL byte (text format's \\000): every one of them that is a
    path (sources, mean files, snapshot_prefix, net) would fail deep inside the run."""
    for field, value in message.ListFields():
        name = prefix + field.name
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                owner = item.name if field.name in ("layer", "layers") else layer
                _refuse_nul(item, path, name + ".", owner)
        elif field.type == field.TYPE_STRING and any("\0" in item for item in values):
            where = f" (in layer {layer!r})" if layer else ""
            raise ImagenetError(f"{path}: {name}{where} holds a NUL byte ('\\000'), which no "
                                "name or path can hold; fix the prototxt")


def layer_line(path: str | Path, layer_name: str) -> int | None:
    """1-based line of the `name: "<layer_name>"` of a layer in a prototxt file, for error
    messages raised after parsing (None when not found)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        m = _NAME_FIELD.match(line)
        if m and m.group(1) == layer_name:
            return i + 1
    return None


def parse_net_text(text: str, source: str = "<string>") -> caffe_pb2.NetParameter:
    """Parse prototxt text into an upgraded NetParameter (see the module docstring)."""
    net = caffe_pb2.NetParameter()
    _parse_text(text, net, source)
    return upgrade_net(net, source)


def read_net_parameter(path: str | Path) -> caffe_pb2.NetParameter:
    """Read a net prototxt (train_val, deploy, or an old V0/V1 file) as an upgraded
    NetParameter. Errors name the file, the line:column and the enclosing layer."""
    return parse_net_text(_read_text(path), str(path))


def read_solver_parameter(path: str | Path) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt. Nets embedded in it (net_param, train_net_param,
    test_net_param) are upgraded like read_net_parameter's."""
    solver = caffe_pb2.SolverParameter()
    _parse_text(_read_text(path), solver, path)
    if solver.HasField("net_param"):
        upgrade_net(solver.net_param, str(path))
    if solver.HasField("train_net_param"):
        upgrade_net(solver.train_net_param, str(path))
    for net in solver.test_net_param:
        upgrade_net(net, str(path))
    return solver


# ---------------------------------------------------------------- upgrades (upgrade_proto.cpp)


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Upgrade in place (and return) a NetParameter to the current format, like Caffe's
    UpgradeNetAsNeeded. Used for prototxt text and for binary .caffemodel files."""
    if any(v1.HasField("layer") for v1 in net.layers):
        _upgrade_v0_net(net, source)
    if net.layers:
        _upgrade_v1_data_transformation(net)
        if net.layer:
            raise ImagenetError(
                f"{source}: the net mixes new `layer` and old `layers` entries; use one form"
            )
        for v1 in net.layers:
            net.layer.append(_upgrade_v1_layer(v1, source))
        del net.layers[:]
    if net.input_dim or net.input_shape:
        _upgrade_net_input(net, source)
    else:
        # A bare `input` without shapes is a legacy caffemodel: dropping it is enough.
        del net.input[:]
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == _BATCHNORM_BLOBS:
            for spec in layer.param:
                if spec.lr_mult != 0:
                    raise ImagenetError(
                        f"{source}: layer {layer.name!r}: BatchNorm statistics cannot be "
                        f"learnable parameters (lr_mult {spec.lr_mult}); remove its `param`"
                    )
            del layer.param[:]
    return net


def _upgrade_net_input(net: caffe_pb2.NetParameter, source: str) -> None:
    # UpgradeNetInput: net-level inputs become the first layer, an "Input" layer named "input".
    has_shape = len(net.input_shape) > 0
    if has_shape and len(net.input_shape) != len(net.input):
        raise ImagenetError(f"{source}: {len(net.input)} `input` names but "
                            f"{len(net.input_shape)} `input_shape` entries")
    if not has_shape and len(net.input_dim) != _LEGACY_INPUT_DIMS * len(net.input):
        raise ImagenetError(f"{source}: {len(net.input)} `input` names need "
                            f"{_LEGACY_INPUT_DIMS * len(net.input)} `input_dim` values, "
                            f"got {len(net.input_dim)}")
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    for i, top in enumerate(net.input):
        layer.top.append(top)
        shape = layer.input_param.shape.add()
        if has_shape:
            shape.CopyFrom(net.input_shape[i])
        else:
            shape.dim.extend(net.input_dim[_LEGACY_INPUT_DIMS * i:_LEGACY_INPUT_DIMS * (i + 1)])
    rest = list(net.layer)
    del net.layer[:]
    net.layer.append(layer)
    net.layer.extend(rest)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def _upgrade_v1_data_transformation(net: caffe_pb2.NetParameter) -> None:
    for v1 in net.layers:
        for pname in _DATA_PARAMS_WITH_TRANSFORM:
            if not v1.HasField(pname):
                continue
            sub = getattr(v1, pname)
            for field in _TRANSFORM_FIELDS:
                if sub.HasField(field):
                    setattr(v1.transform_param, field, getattr(sub, field))
                    sub.ClearField(field)


def _upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, source: str) -> caffe_pb2.LayerParameter:
    # UpgradeV1LayerParameter.
    layer = caffe_pb2.LayerParameter()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
        layer.type = V1_TYPE_NAMES[enum_name]
    layer.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr),
                  len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    layer.loss_weight.extend(v1.loss_weight)
    for pname in _V1_SHARED_PARAMS:
        if v1.HasField(pname):
            getattr(layer, pname).CopyFrom(getattr(v1, pname))
    if v1.HasField("layer"):
        raise ImagenetError(f"{source}: layer {v1.name!r}: V0 layer left after the V0 upgrade")
    return layer


def _upgrade_v0_net(net: caffe_pb2.NetParameter, source: str) -> None:
    # UpgradeV0Net + UpgradeV0PaddingLayers: "padding" layers fold into the next conv's pad.
    pad_of_top: dict[str, tuple[int, str]] = {}  # padding layer top -> (pad, its bottom)
    upgraded: list[caffe_pb2.V1LayerParameter] = []
    for old in net.layers:
        v0 = old.layer
        if v0.type == "padding":
            if len(old.bottom) != 1 or len(old.top) != 1:
                raise ImagenetError(f"{source}: V0 padding layer {v0.name!r} needs one "
                                    "bottom and one top")
            pad_of_top[old.top[0]] = (v0.pad, old.bottom[0])
            continue
        new = _upgrade_v0_layer(old, source)
        for i, bottom in enumerate(new.bottom):
            if bottom in pad_of_top:
                pad, real_bottom = pad_of_top[bottom]
                if new.type != caffe_pb2.V1LayerParameter.CONVOLUTION:
                    raise ImagenetError(f"{source}: V0 padding feeds non-conv layer {new.name!r}")
                new.convolution_param.pad.append(pad)
                new.bottom[i] = real_bottom
        upgraded.append(new)
    del net.layers[:]
    net.layers.extend(upgraded)


def _upgrade_v0_layer(old: caffe_pb2.V1LayerParameter, source: str) -> caffe_pb2.V1LayerParameter:
    # UpgradeV0LayerParameter: V0 fields -> the V1 per-type parameter messages.
    V1 = caffe_pb2.V1LayerParameter
    v0 = old.layer
    new = V1()
    new.bottom.extend(old.bottom)
    new.top.extend(old.top)
    if v0.HasField("name"):
        new.name = v0.name
    if not v0.HasField("type"):
        raise ImagenetError(f"{source}: V0 layer {v0.name!r} has no type")
    if v0.type not in V0_TYPE_NAMES:
        raise ImagenetError(f"{source}: V0 layer {v0.name!r}: unknown type {v0.type!r}; "
                            f"known: {', '.join(sorted(V0_TYPE_NAMES))}")
    new.type = V1.LayerType.Value(V0_TYPE_NAMES[v0.type])
    new.blobs.extend(v0.blobs)
    new.blobs_lr.extend(v0.blobs_lr)
    new.weight_decay.extend(v0.weight_decay)
    t = v0.type
    if t in ("conv", "innerproduct"):
        p = new.convolution_param if t == "conv" else new.inner_product_param
        if v0.HasField("num_output"):
            p.num_output = v0.num_output
        if v0.HasField("biasterm"):
            p.bias_term = v0.biasterm
        if v0.HasField("weight_filler"):
            p.weight_filler.CopyFrom(v0.weight_filler)
        if v0.HasField("bias_filler"):
            p.bias_filler.CopyFrom(v0.bias_filler)
    if t == "conv":
        p = new.convolution_param
        if v0.HasField("pad"):
            p.pad.append(v0.pad)
        if v0.HasField("kernelsize"):
            p.kernel_size.append(v0.kernelsize)
        if v0.HasField("group"):
            p.group = v0.group
        if v0.HasField("stride"):
            p.stride.append(v0.stride)
    elif t == "pool":
        p = new.pooling_param
        if v0.HasField("kernelsize"):
            p.kernel_size = v0.kernelsize
        if v0.HasField("stride"):
            p.stride = v0.stride
        if v0.HasField("pad"):
            p.pad = v0.pad
        if v0.HasField("pool"):
            p.pool = v0.pool
    elif t == "dropout" and v0.HasField("dropout_ratio"):
        new.dropout_param.dropout_ratio = v0.dropout_ratio
    elif t == "lrn":
        for field in ("local_size", "alpha", "beta", "k"):
            if v0.HasField(field):
                setattr(new.lrn_param, field, getattr(v0, field))
    elif t in ("data", "images", "window_data", "hdf5_data"):
        p = {"data": new.data_param, "images": new.image_data_param,
             "window_data": new.window_data_param, "hdf5_data": new.hdf5_data_param}[t]
        if v0.HasField("source"):
            p.source = v0.source
        if v0.HasField("batchsize"):
            p.batch_size = v0.batchsize
        if t != "hdf5_data":
            if v0.HasField("scale"):
                new.transform_param.scale = v0.scale
            if v0.HasField("meanfile"):
                new.transform_param.mean_file = v0.meanfile
            if v0.HasField("cropsize"):
                new.transform_param.crop_size = v0.cropsize
            if v0.HasField("mirror"):
                new.transform_param.mirror = v0.mirror
        if t == "data" and v0.HasField("rand_skip"):
            new.data_param.rand_skip = v0.rand_skip
        if t == "images" and v0.HasField("shuffle_images"):
            new.image_data_param.shuffle = v0.shuffle_images
        if t == "images" and v0.HasField("new_height"):
            new.image_data_param.new_height = v0.new_height
        if t == "images" and v0.HasField("new_width"):
            new.image_data_param.new_width = v0.new_width
    elif t == "concat" and v0.HasField("concat_dim"):
        new.concat_param.concat_dim = v0.concat_dim
    elif t == "hdf5_output" and v0.HasField("hdf5_output_param"):
        new.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
    return new


# ---------------------------------------------------------------- phase filtering (net.cpp)


def phase_value(phase: str | int) -> int:
    """caffe_pb2.Phase value for "TRAIN"/"TEST" (case-insensitive) or an enum value."""
    if isinstance(phase, int):
        if phase not in PHASES.values():
            raise ImagenetError(f"unknown phase {phase}; valid: {', '.join(PHASES)}")
        return phase
    try:
        return PHASES[phase.upper()]
    except KeyError:
        raise ImagenetError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}") from None


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    """Net::StateMeetsRule: does a (phase, level, stages) state satisfy one rule?"""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(
    net_param: caffe_pb2.NetParameter,
    phase: str | int,
    *,
    level: int = 0,
    stages: Sequence[str] = (),
) -> caffe_pb2.NetParameter:
    """Net::FilterNet: a copy of the net holding only the layers whose rules admit the state.
    A layer with no include rules is in unless an exclude rule matches; a layer with include
    rules is in only if one matches. The copy's `state` records the phase, level and stages."""
    state = caffe_pb2.NetState(phase=phase_value(phase), level=level, stage=list(stages))
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    out.state.CopyFrom(state)
    for layer in net_param.layer:
        if layer.include and layer.exclude:
            raise ImagenetError(f"layer {layer.name!r}: specify either include rules or "
                                "exclude rules, not both")
        included = not layer.include
        if any(state_meets_rule(state, rule) for rule in layer.exclude):
            included = False
        if any(state_meets_rule(state, rule) for rule in layer.include):
            included = True
        if included:
            out.layer.append(layer)
    return out


__all__ = [
    "PHASES", "filter_net", "layer_line", "parse_net_text", "phase_value",
    "read_net_parameter", "read_solver_parameter", "state_meets_rule", "upgrade_net",
]
