"""The zoo's recipes by name, sized to a dataset: DIGITS's "standard networks" adapted to the
class count, and Caffe's fine-tuning convention (examples/finetune_flickr_style).

`write_sized_recipe(name, out_dir, classes=N, ...)` copies a recipe's train_val, deploy and
solver prototxts into `out_dir` with:
- every classifier layer (the layer whose output a SoftmaxWithLoss or Softmax reads first:
  AlexNet's fc8, GoogLeNet's three `loss*/classifier` heads, ResNet-50's fc1000) given
  `num_output: N` and, when `rename` is set, the name `<layer>_<rename>` (its top blob and the
  layers reading it follow), so weights copied by layer name never reach it: it starts from
  its filler, as fc8_flickr does;
- when finetuning (`finetune_lr_factor` f > 1), base_lr divided by f and the renamed layers'
  lr_mult multiplied by f (flickr_style: base_lr 0.001 instead of 0.01, fc8_flickr at lr_mult
  10 / 20), so the copied layers move slowly and the new ones at the recipe's rate;
- Accuracy layers with top_k above N dropped (Caffe's AccuracyLayer refuses them);
- with `val_images`, a TEST batch that divides the val set where one near the recipe's does
  (test_batch_for) and test_iter covering it once.
Nothing else changes: the recipe's fillers, transforms and schedule are kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError
from data.proto import caffe_pb2

ZOO_DIR = Path(__file__).resolve().parent
NET_FILE, DEPLOY_FILE, SOLVER_FILE = "train_val.prototxt", "deploy.prototxt", "solver.prototxt"


@dataclass(frozen=True)
class Recipe:
    """A zoo net and the size of the records it is made for (convert's resize)."""

    name: str
    record_size: int
    about: str

    @property
    def folder(self) -> Path:
        return ZOO_DIR / self.name


# The registry of --net names (a name not here fails and lists these).
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("alexnet_mini", 64, "small AlexNet for 64x64 records (crop 57): CPU-sized"),
    Recipe("bvlc_alexnet", 256, "Krizhevsky et al.'s AlexNet as Caffe trains it (crop 227)"),
    Recipe("bvlc_reference_caffenet", 256, "CaffeNet: AlexNet with pooling before LRN"),
    Recipe("bvlc_googlenet", 256, "GoogLeNet with its two auxiliary heads (crop 224)"),
    Recipe("resnet_50", 256, "ResNet-50 with BatchNorm + Scale (crop 224)"),
)}
LOSS_TYPES = ("SoftmaxWithLoss", "Softmax")
SIZED_TYPES = ("InnerProduct", "Convolution")
FINETUNE_LR_FACTOR = 10.0  # examples/finetune_flickr_style: base_lr / 10, new layer lr_mult x 10


@dataclass
class SizedRecipe:
    """What write_sized_recipe wrote and changed."""

    recipe: Recipe
    solver: Path
    net: Path
    deploy: Path
    classes: int
    renamed: dict[str, str] = field(default_factory=dict)   # old layer name -> new
    resized: list[str] = field(default_factory=list)         # layer names (new names)
    dropped: list[str] = field(default_factory=list)         # Accuracy layers removed

    def describe(self) -> str:
        """One line for the log: which layers were sized (and renamed), what was dropped."""
        old_name = {new: old for old, new in self.renamed.items()}
        layers = [f"{old_name[n]} -> {n} (fresh)" if n in old_name else n for n in self.resized]
        text = f"{self.recipe.name} sized to {self.classes} classes: {', '.join(layers)}"
        if self.dropped:
            text += f"; dropped {', '.join(self.dropped)} (top_k > {self.classes} classes)"
        return text


def recipe(name: str) -> Recipe:
    """The recipe called `name`, or ImagenetError listing the valid ones."""
    if name not in RECIPES:
        raise ImagenetError(f"unknown net {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]


def layer_suffix(text: str) -> str:
    """A dataset name as a layer-name suffix (flickr_style's `fc8_flickr`): lower case,
    letters, digits and underscores only ('own' when nothing is left)."""
    cleaned = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    return cleaned or "own"


def _read(path: Path, message):
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), message)
    except text_format.ParseError as err:
        raise ImagenetError(f"{path}: {err}") from err
    return message


def classifier_layers(net: caffe_pb2.NetParameter) -> list[str]:
    """Names of the layers whose output a SoftmaxWithLoss or Softmax reads first, in net
    order: what has one output per class."""
    producer: dict[str, caffe_pb2.LayerParameter] = {}
    found: list[str] = []
    for layer in net.layer:
        if layer.type in LOSS_TYPES and layer.bottom:
            src = producer.get(layer.bottom[0])
            if src is not None and src.type in SIZED_TYPES and src.name not in found:
                found.append(src.name)
        for top in layer.top:
            producer[top] = layer
    return found


def _num_output_param(layer: caffe_pb2.LayerParameter):
    return (layer.inner_product_param if layer.type == "InnerProduct"
            else layer.convolution_param)


def _blob_count(layer: caffe_pb2.LayerParameter) -> int:
    return 2 if _num_output_param(layer).bias_term else 1


def size_net(net: caffe_pb2.NetParameter, classes: int, *, rename: str | None = None,
             lr_factor: float = 1.0) -> tuple[list[str], dict[str, str], list[str]]:
    """Size `net`'s classifier layers in place (see the module docstring); returns (resized
    layer names, {old: new name}, dropped Accuracy layers)."""
    if classes < 2:
        raise ImagenetError(f"a classifier needs at least 2 classes, got {classes}")
    targets = classifier_layers(net)
    if not targets:
        raise ImagenetError(f"net {net.name!r}: no InnerProduct or Convolution layer feeds a "
                            "SoftmaxWithLoss or Softmax, so there is no classifier to size")
    renamed: dict[str, str] = {}
    blobs: dict[str, str] = {}
    for layer in net.layer:
        if layer.name not in targets:
            continue
        _num_output_param(layer).num_output = classes
        if rename:
            new = f"{layer.name}_{rename}"
            renamed[layer.name] = new
            for i, top in enumerate(layer.top):
                if top == layer.name:
                    blobs[top] = new
                    layer.top[i] = new
            layer.name = new
            if lr_factor != 1.0:
                while len(layer.param) < _blob_count(layer):
                    layer.param.add()
                for spec in layer.param:
                    spec.lr_mult = (spec.lr_mult if spec.HasField("lr_mult") else 1.0) * lr_factor
    dropped: list[str] = []
    for index in reversed(range(len(net.layer))):
        layer = net.layer[index]
        for i, bottom in enumerate(layer.bottom):
            layer.bottom[i] = blobs.get(bottom, bottom)
        if layer.type == "Accuracy" and layer.accuracy_param.top_k > classes:
            dropped.insert(0, layer.name)
            del net.layer[index]
    return [renamed.get(t, t) for t in targets], renamed, dropped


def _test_layers(net: caffe_pb2.NetParameter) -> list[caffe_pb2.LayerParameter]:
    out = []
    for layer in net.layer:
        if layer.type in ("Data", "ImageData") and any(
                r.HasField("phase") and r.phase == caffe_pb2.TEST for r in layer.include):
            out.append(layer)
    return out


def test_batch_for(batch: int, val_images: int) -> int:
    """A TEST batch size that sees the val set once without wrapping around (a wrapped batch
    counts some images twice): the whole set when it is smaller than `batch`, else the largest
    divisor of it between batch/2 and batch, else `batch` itself."""
    if val_images <= batch:
        return val_images
    for size in range(batch, (batch + 1) // 2 - 1, -1):
        if val_images % size == 0:
            return size
    return batch


def _fit_test_pass(net: caffe_pb2.NetParameter, solver: caffe_pb2.SolverParameter,
                   val_images: int) -> None:
    """TEST batch fitted to the val set (test_batch_for), test_iter = batches to see it once."""
    batch = 0
    for layer in _test_layers(net):
        param = layer.data_param if layer.type == "Data" else layer.image_data_param
        param.batch_size = test_batch_for(param.batch_size, val_images)
        batch = param.batch_size
    if batch:
        del solver.test_iter[:]
        solver.test_iter.append(max(1, math.ceil(val_images / batch)))


def write_sized_recipe(name: str, out_dir: Path | str, *, classes: int,
                       rename: str | None = None, finetune_lr_factor: float = 1.0,
                       val_images: int | None = None) -> SizedRecipe:
    """Write recipe `name`'s train_val, deploy and solver into `out_dir`, sized to `classes`
    (see the module docstring). Files whose text is unchanged are not rewritten."""
    if finetune_lr_factor <= 0:
        raise ImagenetError(f"finetune_lr_factor must be > 0, got {finetune_lr_factor}")
    r = recipe(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = _read(r.folder / NET_FILE, caffe_pb2.NetParameter())
    deploy = _read(r.folder / DEPLOY_FILE, caffe_pb2.NetParameter())
    solver = _read(r.folder / SOLVER_FILE, caffe_pb2.SolverParameter())
    resized, renamed, dropped = size_net(net, classes, rename=rename,
                                         lr_factor=finetune_lr_factor)
    size_net(deploy, classes, rename=rename)  # learning rates mean nothing there
    if finetune_lr_factor != 1.0:
        # float32 in the proto: rounded to its 7 digits, so 0.01 / 10 prints as 0.001
        solver.base_lr = float(f"{solver.base_lr / finetune_lr_factor:.7g}")
    if val_images:
        _fit_test_pass(net, solver, val_images)
    solver.net = str(out / NET_FILE)
    paths = {}
    for file_name, message in ((NET_FILE, net), (DEPLOY_FILE, deploy), (SOLVER_FILE, solver)):
        path = out / file_name
        text = (f"# {r.name} ({r.folder / file_name}) sized to {classes} classes by "
                f"model/zoo/recipes.py\n" + text_format.MessageToString(message))
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_bytes_atomic(path, text.encode("utf-8"), durable=False)
        paths[file_name] = path
    return SizedRecipe(r, paths[SOLVER_FILE], paths[NET_FILE], paths[DEPLOY_FILE], classes,
                       renamed, resized, dropped)
