"""model/zoo/recipes: the zoo's nets sized to a dataset's class count, with Caffe's fine-tuning
convention (renamed classifier layers start fresh, optionally a higher lr_mult)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.caffemodel import copy_layers, load_caffemodel, save_caffemodel
from model.net import Net
from model.prototxt import read_net_parameter, read_solver_parameter
from model.zoo import recipes

# The classifier layers of each recipe (every head of GoogLeNet).
HEADS = {"alexnet_mini": ["fc8"], "bvlc_alexnet": ["fc8"], "bvlc_reference_caffenet": ["fc8"],
         "bvlc_googlenet": ["loss1/classifier", "loss2/classifier", "loss3/classifier"],
         "resnet_50": ["fc1000"]}


def _produced_before_use(net: caffe_pb2.NetParameter) -> None:
    """Every bottom is a top of an earlier layer (a renamed blob left no dangling reader)."""
    seen: set[str] = set()
    for layer in net.layer:
        for bottom in layer.bottom:
            assert bottom in seen, (layer.name, bottom)
        seen.update(layer.top)


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_is_sized_renamed_and_still_wired(name, tmp_path) -> None:
    r = recipes.write_sized_recipe(name, tmp_path / name, classes=4, rename="flowers",
                                   finetune_lr_factor=10, val_images=9)
    assert r.resized == [f"{h}_flowers" for h in HEADS[name]]
    assert r.renamed == {h: f"{h}_flowers" for h in HEADS[name]}
    original = read_solver_parameter(recipes.RECIPES[name].folder / "solver.prototxt")
    for path in (r.net, r.deploy):
        net = read_net_parameter(path)
        by_name = {layer.name: layer for layer in net.layer}
        heads = HEADS[name] if path == r.net else HEADS[name][-1:]  # deploy: the main head
        assert recipes.classifier_layers(net) == [f"{h}_flowers" for h in heads]
        for head in heads:
            assert head not in by_name
            layer = by_name[f"{head}_flowers"]
            assert layer.inner_product_param.num_output == 4
            if path == r.net:
                assert [p.lr_mult for p in layer.param] == [10, 20]  # flickr_style's fc8_flickr
        assert not [l for l in net.layer if l.type == "Accuracy" and l.accuracy_param.top_k > 4]
        _produced_before_use(net)
    solver = read_solver_parameter(r.solver)
    assert solver.base_lr == pytest.approx(original.base_lr / 10)
    assert solver.net == str(r.net)
    assert list(solver.test_iter) == [1]  # the TEST batch shrank to the 9 val images
    assert r.describe().startswith(f"{name} sized to 4 classes: {HEADS[name][0]} -> ")


def test_sizing_without_finetuning_keeps_the_rates_and_test_pass(tmp_path) -> None:
    r = recipes.write_sized_recipe("alexnet_mini", tmp_path / "n", classes=7)
    net = read_net_parameter(r.net)
    fc8 = next(l for l in net.layer if l.name == "fc8")
    assert fc8.inner_product_param.num_output == 7 and [p.lr_mult for p in fc8.param] == [1, 2]
    solver = read_solver_parameter(r.solver)
    original = read_solver_parameter(recipes.RECIPES["alexnet_mini"].folder / "solver.prototxt")
    assert solver.base_lr == original.base_lr and solver.test_iter == original.test_iter
    # unchanged text is not rewritten (the training folder's id depends on it)
    stamp = r.net.stat().st_mtime_ns
    recipes.write_sized_recipe("alexnet_mini", tmp_path / "n", classes=7)
    assert r.net.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("batch, val, want", [(25, 9, 9), (25, 40, 20), (25, 50, 25),
                                              (25, 53, 25), (50, 1000, 50), (50, 998, 50), (50, 990, 45)])
def test_test_batch_sees_the_val_set_once(batch, val, want) -> None:
    assert recipes.test_batch_for(batch, val) == want


def test_unknown_recipe_and_too_few_classes_fail_in_one_line(tmp_path) -> None:
    with pytest.raises(ImagenetError, match="unknown net 'vgg16'; valid: alexnet_mini, "):
        recipes.write_sized_recipe("vgg16", tmp_path, classes=3)
    with pytest.raises(ImagenetError, match="at least 2 classes"):
        recipes.write_sized_recipe("alexnet_mini", tmp_path, classes=1)
    assert recipes.layer_suffix("My Flowers (2024)!") == "my_flowers_2024"
    assert recipes.layer_suffix("été") == "t" and recipes.layer_suffix("***") == "own"


def test_finetuning_copies_every_layer_but_the_renamed_classifier(tmp_path) -> None:
    """Caffe's CopyTrainedLayersFrom by name: the 10-class alexnet_mini's weights fill the
    5-class net except fc8_flowers, which keeps its filler (the source's fc8 is ignored)."""
    source_net = Net.from_prototxt(recipes.RECIPES["alexnet_mini"].folder / "deploy.prototxt",
                                   "TEST")
    source = source_net.init(jax.random.PRNGKey(0))
    save_caffemodel(tmp_path / "pre.caffemodel", source_net, source)
    r = recipes.write_sized_recipe("alexnet_mini", tmp_path / "n", classes=5, rename="flowers",
                                   finetune_lr_factor=10)
    net = Net.from_prototxt(r.deploy, "TEST")
    fresh = net.init(jax.random.PRNGKey(1))
    lines: list[str] = []
    params = copy_layers(net, fresh, [load_caffemodel(tmp_path / "pre.caffemodel")],
                         log=lines.append)
    assert lines == ["Ignoring source layer fc8"]
    assert np.array_equal(params["conv1"][0], source["conv1"][0])
    assert np.array_equal(params["fc7"][0], source["fc7"][0])
    assert params["fc8_flowers"][0].shape == (5, 64)
    assert np.array_equal(params["fc8_flowers"][0], fresh["fc8_flowers"][0])
