"""What a trained model needs to answer: the inference bundle written beside its snapshots.

A `.caffemodel` holds weights only. Classifying an image with it also needs the deploy net, the
size the training images were resized to, the crop, the mean (file or values), the input scale
(`transform_param { scale }`) and the class names; Caffe leaves the user to pass all of them
again (python/classify.py's flags), and a wrong one gives confident wrong answers. So training
(`imagenet train`, the pipeline's train stage) writes, beside the snapshots of a prefix:

    <prefix>.inference.json       the bundle (below), written last and atomically
    <prefix>.deploy.prototxt      the deploy net derived from the net that was trained
    <prefix>.mean.binaryproto     a copy of the mean file the net subtracted (if it has one)
    <prefix>.labels.txt           a copy of the class names, line i = class i (if known)

and `imagenet classify --weights=<prefix>_iter_N.caffemodel IMAGE` finds the bundle from the
weights' name (`find_bundle`): `<name>.inference.json` first (a model exported or renamed with
its own bundle), then the bundle of the snapshot prefix (`<prefix>_iter_<N>` -> `<prefix>`),
following a symbolic link to the weights. Caffe never reads these files, and a bare Caffe
`.caffemodel` keeps working with explicit flags.

The bundle's format (`FORMAT`; file names relative to the bundle's folder):

    {"format": "imagenet-pipeline inference v1",
     "net": "snap.deploy.prototxt", "input": "data", "output": "prob",
     "channels": 3, "image_hw": [64, 64], "crop_hw": [57, 57],
     "mean_file": "snap.mean.binaryproto", "mean_value": null,
     "raw_scale": 255.0, "input_scale": 0.015625,
     "labels": "snap.labels.txt", "classes": 10, "resize_mode": "squash",
     "trained_from": {"net": "/abs/train_val.prototxt", "mean_file": "...", "labels": "..."}}

`image_hw` is the size of the training records (images are resized to it, as convert_imageset
did, by `resize_mode`: data.images.RESIZE_MODES, squash when absent), `crop_hw` the net's input (the TEST-phase crop), pixels are BGR in 0..255 times
raw_scale/255, minus the mean, times input_scale (Caffe's DataTransformer). `labels` and
`classes` are null when the class names are unknown; `mean_file`/`mean_value` both null when
the net subtracts nothing.

The deploy net is derived from the trained net (`derive_deploy`), not taken from a file beside
it, so a net whose class count was changed for a dataset answers with that count: the TEST
phase, its Data/ImageData layer replaced by an Input layer of shape (1, C, crop_h, crop_w), the
layers the class scores depend on, and a Softmax `prob` on the scores of the SoftmaxWithLoss
with the largest loss_weight (GoogLeNet's main head, not its auxiliary ones).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from google.protobuf import text_format

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError
from data.proto import caffe_pb2
from data.textlines import read_caffe_lines

FORMAT = "imagenet-pipeline inference v1"
BUNDLE_SUFFIX = ".inference.json"
DEPLOY_SUFFIX = ".deploy.prototxt"
MEAN_SUFFIX = ".mean.binaryproto"
LABELS_SUFFIX = ".labels.txt"
CAFFEMODEL_SUFFIX = ".caffemodel"
# Caffe's snapshot names: <prefix>_iter_<N>.caffemodel (solver.cpp SnapshotFilename).
_SNAPSHOT_RE = re.compile(r"^(?P<prefix>.+)_iter_\d+$")
# Data layers that feed images a deploy net replaces by an Input layer.
IMAGE_DATA_TYPES = ("Data", "ImageData")
# The class-score loss whose bottom is the net's answer; its Softmax is the deploy output.
CLASSIFIER_LOSS = "SoftmaxWithLoss"
OUTPUT_BLOB = "prob"
# Pixels are stored 0..255 (convert_imageset): python/classify.py's --raw_scale default.
RAW_SCALE = 255.0
# Where class names are looked for when none are given: beside the net's LMDB (or listing),
# then one folder up (the pipeline's <data root>/lmdb/ layout); the user's own names first.
LABEL_FILE_NAMES = ("labels.txt", "synset_words.txt")
LABEL_SEARCH_DEPTH = 2


@dataclass(frozen=True)
class Bundle:
    """A parsed inference bundle, paths absolute."""

    path: Path
    net: Path
    input: str
    output: str
    channels: int
    image_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    mean_file: Path | None
    mean_value: list[float] | None
    raw_scale: float
    input_scale: float
    labels: Path | None
    classes: int | None
    resize_mode: str = "squash"


# ---------------------------------------------------------------- finding and reading


def bundle_path(prefix: str | os.PathLike) -> Path:
    """The bundle of a snapshot prefix (or of a weights file's stem)."""
    return Path(f"{os.fspath(prefix)}{BUNDLE_SUFFIX}")


def bundle_candidates(weights: str | os.PathLike) -> list[Path]:
    """Where the bundle of `weights` may be, in the order they are tried: named after the file,
    then after its snapshot prefix; the same for the file a symbolic link points to."""
    out: list[Path] = []
    paths = [Path(weights)]
    if Path(weights).is_symlink():
        paths.append(Path(weights).resolve())
    for path in paths:
        stem = path.name[:-len(CAFFEMODEL_SUFFIX)] if path.name.endswith(CAFFEMODEL_SUFFIX) \
            else path.name
        out.append(path.with_name(stem + BUNDLE_SUFFIX))
        match = _SNAPSHOT_RE.match(stem)
        if match:
            out.append(path.with_name(match.group("prefix") + BUNDLE_SUFFIX))
    return list(dict.fromkeys(out))


def find_bundle(weights: str | os.PathLike) -> Path | None:
    """The bundle that belongs to `weights`, or None (a bare Caffe .caffemodel)."""
    return next((p for p in bundle_candidates(weights) if p.is_file()), None)


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Parse a bundle; an ImagenetError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ImagenetError(f"{path}: cannot read the inference bundle ({err.strerror})") from None
    except ValueError as err:
        raise ImagenetError(f"{path}: not an inference bundle (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ImagenetError(f"{path}: not an inference bundle of this version (format {got!r}, "
                            f"expected {FORMAT!r})")
    folder = path.parent

    def file(key: str) -> Path | None:
        name = data.get(key)
        if name is None:
            return None
        p = folder / name
        if not p.is_file():
            raise ImagenetError(f"{path}: its {key} file {p} is missing; copy it with the "
                                "bundle, or give the flag instead")
        return p

    try:
        mean_value = data.get("mean_value")
        return Bundle(
            path=path, net=file("net"), input=str(data["input"]), output=str(data["output"]),
            channels=int(data["channels"]),
            image_hw=(int(data["image_hw"][0]), int(data["image_hw"][1])),
            crop_hw=(int(data["crop_hw"][0]), int(data["crop_hw"][1])),
            mean_file=file("mean_file"),
            mean_value=[float(v) for v in mean_value] if mean_value else None,
            raw_scale=float(data.get("raw_scale", RAW_SCALE)),
            input_scale=float(data.get("input_scale", 1.0)),
            labels=file("labels"),
            classes=int(data["classes"]) if data.get("classes") is not None else None,
            resize_mode=str(data.get("resize_mode") or "squash"))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ImagenetError(f"{path}: inference bundle field missing or wrong ({err!r})") from None


@dataclass(frozen=True)
class ClassifySettings:
    """What `imagenet classify` runs with: the bundle's values where the user gave none."""

    model: str
    mean_file: str | None
    mean_values: list[float] | None
    raw_scale: float
    input_scale: float
    image_hw: tuple[int, int] | None
    labels: str | None
    bundle: Path | None
    resize_mode: str = "squash"


def resolve_settings(weights: str, *, model: str | None = None, mean_file: str | None = None,
                     mean_values: Sequence[float] | None = None, raw_scale: float | None = None,
                     input_scale: float | None = None, image_hw: tuple[int, int] | None = None,
                     labels: str | None = None, resize_mode: str | None = None
                     ) -> ClassifySettings:
    """The settings for classifying with `weights`: every argument given wins; the rest come
    from the weights' bundle (`find_bundle`), else Caffe's defaults (python/classify.py). A
    mean given either way (file or values) replaces the bundle's mean of either kind."""
    found = find_bundle(weights)
    if found is None:
        if model is None:
            tried = ", ".join(str(p) for p in bundle_candidates(weights))
            raise ImagenetError(f"{weights} has no inference bundle beside it (looked for "
                                f"{tried}): give --model=deploy.prototxt and the preprocessing "
                                "flags (--mean, --input_scale, ...) as for a Caffe .caffemodel")
        return ClassifySettings(model=model, mean_file=mean_file,
                                mean_values=list(mean_values) if mean_values else None,
                                raw_scale=RAW_SCALE if raw_scale is None else raw_scale,
                                input_scale=1.0 if input_scale is None else input_scale,
                                image_hw=image_hw, labels=labels, bundle=None,
                                resize_mode=resize_mode or "squash")
    b = read_bundle(found)
    own_mean = mean_file is not None or bool(mean_values)
    return ClassifySettings(
        model=model or str(b.net),
        mean_file=mean_file if own_mean else (str(b.mean_file) if b.mean_file else None),
        mean_values=(list(mean_values) if mean_values else None) if own_mean else b.mean_value,
        raw_scale=b.raw_scale if raw_scale is None else raw_scale,
        input_scale=b.input_scale if input_scale is None else input_scale,
        image_hw=image_hw or b.image_hw,
        labels=labels or (str(b.labels) if b.labels else None),
        bundle=found, resize_mode=resize_mode or b.resize_mode)


# ---------------------------------------------------------------- deriving the deploy net


def _loss_weight(layer: caffe_pb2.LayerParameter) -> float:
    return float(layer.loss_weight[0]) if layer.loss_weight else 1.0


def _test_phase(net_param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    from model.prototxt import filter_net, upgrade_net

    upgraded = caffe_pb2.NetParameter()
    upgraded.CopyFrom(net_param)
    return filter_net(upgrade_net(upgraded), "TEST")


def test_data_layer(net_param: caffe_pb2.NetParameter) -> caffe_pb2.LayerParameter:
    """The TEST-phase Data or ImageData layer (the images the net was scored on)."""
    return _data_layer(_test_phase(net_param), net_param.name)


def _data_layer(test: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    layers = [l for l in test.layer if l.type in IMAGE_DATA_TYPES]
    if len(layers) != 1:
        raise ImagenetError(f"the TEST phase of net {name!r} has {len(layers)} "
                            f"Data/ImageData layers; a deploy net can be derived from one")
    return layers[0]


def derive_deploy(net_param: caffe_pb2.NetParameter, *, channels: int,
                  crop_hw: tuple[int, int]) -> caffe_pb2.NetParameter:
    """The deploy net of a train_val net: see the module docstring. Raises ImagenetError when
    the net has no single image input or no SoftmaxWithLoss naming its class scores."""
    test = _test_phase(net_param)
    data = _data_layer(test, net_param.name)
    layers = list(test.layer)  # by index: upb hands out a new wrapper on every access
    data_at = next(i for i, l in enumerate(layers) if l.name == data.name and l.type == data.type)
    heads = [i for i, l in enumerate(layers) if l.type == CLASSIFIER_LOSS]
    if not heads:
        raise ImagenetError(f"net {net_param.name!r} has no {CLASSIFIER_LOSS} layer in its "
                            "TEST phase: cannot tell which blob holds the class scores")
    head = max(heads, key=lambda i: (_loss_weight(layers[i]), i))
    scores = layers[head].bottom[0]
    labels = set(data.top[1:])
    # Walk back from the scores: keep the layers whose tops they depend on (in-place layers
    # such as ReLU and Dropout write the blob they read, so they stay with their producer).
    needed, kept = {scores}, []
    for i in range(head - 1, -1, -1):
        layer = layers[i]
        if i == data_at or not set(layer.top) & needed:
            continue
        kept.append(layer)
        needed |= set(layer.bottom)
    if needed & labels:
        raise ImagenetError(f"net {net_param.name!r}: the class scores {scores!r} depend on the "
                            f"label blob {sorted(needed & labels)}; cannot derive a deploy net")
    image = data.top[0]
    if image not in needed:
        raise ImagenetError(f"net {net_param.name!r}: the class scores {scores!r} do not depend "
                            f"on the image blob {image!r}")
    out = caffe_pb2.NetParameter(name=test.name)
    inp = out.layer.add(name=data.name, type="Input", top=[image])
    inp.input_param.shape.add(dim=[1, int(channels), int(crop_hw[0]), int(crop_hw[1])])
    for layer in reversed(kept):
        copy = out.layer.add()
        copy.CopyFrom(layer)
        del copy.include[:]
        del copy.exclude[:]
        copy.ClearField("phase")
    out.layer.add(name=OUTPUT_BLOB, type="Softmax", bottom=[scores], top=[OUTPUT_BLOB])
    return out


# ---------------------------------------------------------------- writing


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def _record_chw(layer: caffe_pb2.LayerParameter, root: Path) -> tuple[int, int, int]:
    """(C, H, W) of the records the layer reads, before cropping."""
    if layer.type == "ImageData":
        from data.image_data import first_image_chw

        return first_image_chw(layer, root)
    from data.datum import decode_datum_bytes
    from data.lmdb_io import LmdbReader

    source = _resolve(layer.data_param.source, root)
    with LmdbReader(source) as reader:
        first = reader.first()
        if first is None:
            raise ImagenetError(f"layer {layer.name!r}: {source} is empty")
        force = layer.transform_param.force_color or layer.data_param.force_encoded_color
        c, h, w = decode_datum_bytes(first[1], force_color=force)[0].shape
    return int(c), int(h), int(w)


def find_labels(layer: caffe_pb2.LayerParameter, root: Path) -> Path | None:
    """A class-names file near the data the net read (LABEL_FILE_NAMES, LABEL_SEARCH_DEPTH)."""
    source = layer.image_data_param.source if layer.type == "ImageData" \
        else layer.data_param.source
    if not source:
        return None
    folder = _resolve(source, root).resolve().parent
    for _ in range(LABEL_SEARCH_DEPTH):
        for name in LABEL_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
        folder = folder.parent
    return None


def _f32(value: float) -> float:
    """A float32 proto field as the shortest decimal that reads back as the same float32
    (0.02, not 0.019999999552965164)."""
    return float(str(np.float32(value)))


def _write_text_if_changed(path: Path, payload: bytes) -> None:
    if path.is_file() and path.read_bytes() == payload:
        return
    write_bytes_atomic(path, payload, durable=False)


def write_bundle(prefix: str | os.PathLike, net_param: caffe_pb2.NetParameter, *,
                 root: str | os.PathLike = ".", labels: str | os.PathLike | None = None,
                 net_source: str | None = None, resize_mode: str = "squash"
                 ) -> tuple[Path, list[str]]:
    """Write the inference bundle of snapshot prefix `prefix` for the train_val net
    `net_param` (its paths relative to `root`, as Caffe resolves them against the working
    directory). `labels`: the class names (line i = class i); None: looked for near the data
    (`find_labels`). Returns (bundle path, notes): the notes say what could not be recorded
    (labels whose count differs from the net's classes, say). `resize_mode`: how the records
    were resized (data.images.RESIZE_MODES), so classify resizes alike. Files holding the same
    bytes are left untouched; the JSON is written last."""
    from model.net import Net

    root = Path(root)
    prefix = Path(os.fspath(prefix))
    prefix = prefix if prefix.is_absolute() else root / prefix
    notes: list[str] = []
    data = test_data_layer(net_param)
    tp = data.transform_param
    mean: np.ndarray | None = None
    mean_src = _resolve(tp.mean_file, root) if tp.HasField("mean_file") else None
    if mean_src is not None:
        from data.datum import read_blobproto

        mean = read_blobproto(mean_src)
        mean = mean[0] if mean.ndim == 4 else mean
        channels, image_hw = int(mean.shape[0]), (int(mean.shape[1]), int(mean.shape[2]))
    else:
        c, h, w = _record_chw(data, root)
        channels, image_hw = c, (h, w)
    crop_hw = (int(tp.crop_size), int(tp.crop_size)) if tp.crop_size else image_hw
    deploy = derive_deploy(net_param, channels=channels, crop_hw=crop_hw)
    net = Net(deploy, "TEST", source=net_source or "derived deploy net")
    classes = int(np.prod(net.blob_shapes[OUTPUT_BLOB][1:]))

    label_src = Path(labels) if labels is not None else find_labels(data, root)
    label_bytes: bytes | None = None
    if label_src is not None:
        if not label_src.is_file():
            raise ImagenetError(f"labels file {label_src} does not exist")
        lines = read_caffe_lines(label_src)
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) == classes:
            label_bytes = ("\n".join(lines) + "\n").encode("utf-8")
        else:
            notes.append(f"class names not recorded: {label_src} has {len(lines)} lines, the "
                         f"net {classes} classes")
            label_src = None

    prefix.parent.mkdir(parents=True, exist_ok=True)
    files = {"net": prefix.with_name(prefix.name + DEPLOY_SUFFIX),
             "mean_file": prefix.with_name(prefix.name + MEAN_SUFFIX),
             "labels": prefix.with_name(prefix.name + LABELS_SUFFIX)}
    header = (f"# Deploy net derived by imagenet-pipeline (model/bundle.py) from "
              f"{net_source or 'the trained net'}:\n# feed (BGR pixels resized to "
              f"{image_hw[0]}x{image_hw[1]} - mean) * {_f32(tp.scale) if tp.HasField('scale') else 1.0:g},"
              f" {crop_hw[0]}x{crop_hw[1]} crops.\n")
    _write_text_if_changed(files["net"], (header + text_format.MessageToString(deploy)).encode())
    if mean_src is not None:
        _write_text_if_changed(files["mean_file"], mean_src.read_bytes())
    if label_bytes is not None:
        _write_text_if_changed(files["labels"], label_bytes)
    body: dict[str, Any] = {
        "format": FORMAT,
        "net": files["net"].name, "input": deploy.layer[0].top[0], "output": OUTPUT_BLOB,
        "channels": channels, "image_hw": list(image_hw), "crop_hw": list(crop_hw),
        "mean_file": files["mean_file"].name if mean_src is not None else None,
        "mean_value": [_f32(v) for v in tp.mean_value] or None,
        "raw_scale": RAW_SCALE,
        "input_scale": _f32(tp.scale) if tp.HasField("scale") else 1.0,
        "labels": files["labels"].name if label_bytes is not None else None,
        "classes": classes,
        "resize_mode": resize_mode,
        "trained_from": {"net": net_source, "mean_file": str(mean_src) if mean_src else None,
                         "labels": str(label_src) if label_src else None},
    }
    path = bundle_path(prefix)
    _write_text_if_changed(path, (json.dumps(body, indent=1) + "\n").encode())
    return path, notes


def write_for_solver(solver_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                     labels: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """The bundle for the snapshots `caffe train --solver=solver_path` writes: its net (the
    generic `net`/`net_param`, else the first test net) and snapshot_prefix (the solver's file
    name without extension when unset, as Caffe), paths relative to `root` (the working
    directory)."""
    from model.prototxt import read_net_parameter, read_solver_parameter

    root = Path.cwd() if root is None else Path(root)
    spath = _resolve(os.fspath(solver_path), root)
    sp = read_solver_parameter(spath)
    if sp.HasField("net_param"):
        net, source = sp.net_param, f"{spath} (net_param)"
    elif sp.HasField("net"):
        net, source = read_net_parameter(_resolve(sp.net, root)), str(_resolve(sp.net, root))
    elif len(sp.test_net):
        net, source = read_net_parameter(_resolve(sp.test_net[0], root)), str(
            _resolve(sp.test_net[0], root))
    else:
        raise ImagenetError(f"{spath}: no net, net_param or test_net to derive a deploy net from")
    prefix = sp.snapshot_prefix or str(spath.with_suffix(""))
    return write_bundle(prefix, net, root=root, labels=labels, net_source=source)


__all__ = ["Bundle", "ClassifySettings", "FORMAT", "bundle_candidates", "bundle_path",
           "derive_deploy", "find_bundle", "find_labels", "read_bundle", "resolve_settings",
           "write_bundle", "write_for_solver"]
