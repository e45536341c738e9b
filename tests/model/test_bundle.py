"""model/bundle.py: the inference bundle training writes beside its snapshots, so that
`imagenet classify --weights=X.caffemodel IMAGE` needs no other flag.

The deploy net derived from every zoo train_val is the zoo's own deploy net (layer for layer,
GoogLeNet's auxiliary heads pruned); on the resnet-mini golden, classify with the bundle alone
gives exactly the scores of the explicit flags Caffe's classifier needs (and a flag given still
wins); the bundle is found from the snapshot name, a renamed copy and a symbolic link."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from flows.cli import main
from model import bundle
from model.prototxt import filter_net, read_net_parameter

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"
MINI = "resnet-mini"


def _layers(net: caffe_pb2.NetParameter) -> list[tuple[str, str]]:
    return [(l.name, l.type) for l in net.layer]


@pytest.mark.parametrize("name", ["alexnet_mini", "bvlc_alexnet", "bvlc_reference_caffenet",
                                  "bvlc_googlenet", "resnet_50"])
def test_derived_deploy_is_the_zoo_deploy(name: str) -> None:
    zoo_deploy = filter_net(read_net_parameter(ZOO / name / "deploy.prototxt"), "TEST")
    train_val = read_net_parameter(ZOO / name / "train_val.prototxt")
    data = bundle.test_data_layer(train_val)
    crop = data.transform_param.crop_size
    derived = bundle.derive_deploy(train_val, channels=3, crop_hw=(crop, crop))
    assert _layers(derived)[1:] == _layers(zoo_deploy)[1:]
    assert derived.layer[0].type == "Input" and list(derived.layer[0].input_param.shape[0].dim) \
        == [1, 3, crop, crop]
    assert derived.layer[-1].top == ["prob"]
    for ours, theirs in zip(derived.layer[1:], zoo_deploy.layer[1:]):
        assert list(ours.bottom) == list(theirs.bottom) and list(ours.top) == list(theirs.top)
        assert not ours.include and not ours.exclude


def test_deploy_of_a_net_that_is_no_classifier_is_refused() -> None:
    net = text_format.Parse("""
        layer { name: "data" type: "Data" top: "data" top: "label"
                data_param { source: "x" batch_size: 1 } }
        layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
                inner_product_param { num_output: 2 } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "loss" }
        """, caffe_pb2.NetParameter())
    with pytest.raises(ImagenetError, match="no SoftmaxWithLoss layer"):
        bundle.derive_deploy(net, channels=3, crop_hw=(4, 4))
    two = text_format.Parse("""
        layer { name: "a" type: "Data" top: "a" top: "label" data_param { source: "x" } }
        layer { name: "b" type: "Data" top: "b" data_param { source: "y" } }
        """, caffe_pb2.NetParameter())
    with pytest.raises(ImagenetError, match="has 2 Data/ImageData layers"):
        bundle.derive_deploy(two, channels=3, crop_hw=(4, 4))


@pytest.fixture
def trained(golden, tmp_path) -> Path:
    """The resnet-mini golden as `imagenet train` leaves it: snapshots of prefix `det` in a
    folder of their own, the bundle beside them (net paths relative to the golden folder, as
    Caffe resolves them against its working directory)."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(golden / MINI / "det_iter_10.caffemodel", folder)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {c}\n" for c in "abcde"))
    path, notes = bundle.write_bundle(folder / "det", read_net_parameter(golden / MINI /
                                                                          "net.prototxt"),
                                      root=golden / MINI, labels=names, net_source="net.prototxt")
    assert notes == [] and path == folder / "det.inference.json"
    return folder


def classify(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["classify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bundle_records_what_classify_needs(trained: Path) -> None:
    data = json.loads((trained / "det.inference.json").read_text())
    assert data["format"] == bundle.FORMAT
    assert (data["image_hw"], data["crop_hw"], data["channels"]) == ([64, 64], [56, 56], 3)
    assert (data["input_scale"], data["raw_scale"], data["classes"]) == (0.02, 255.0, 5)
    assert data["mean_file"] == "det.mean.binaryproto" and data["labels"] == "det.labels.txt"
    assert (trained / "det.labels.txt").read_text().splitlines()[4] == "class e"
    b = bundle.read_bundle(trained / "det.inference.json")
    assert b.net == trained / "det.deploy.prototxt" and b.mean_file.is_file()


def test_classify_with_the_bundle_alone_equals_the_explicit_flags(golden, trained, capsys):
    image = str(golden / "val" / "ILSVRC2012_val_00000001.JPEG")
    weights = str(trained / "det_iter_10.caffemodel")
    code, alone, err = classify(capsys, f"--weights={weights}", "--json", image)
    assert code == 0, err and "settings from det.inference.json" in err
    code, explicit, _ = classify(
        capsys, f"--weights={weights}", f"--model={trained / 'det.deploy.prototxt'}",
        f"--mean={golden / MINI / 'mean_64.binaryproto'}", "--input_scale=0.02",
        f"--labels={trained / 'det.labels.txt'}", "--json", image)
    assert code == 0 and json.loads(alone) == json.loads(explicit)
    assert json.loads(alone)["top_k"][0]["label"].startswith("class ")
    # an explicit flag wins over the bundle
    code, other, _ = classify(capsys, f"--weights={weights}", "--input_scale=1", "--json", image)
    assert code == 0 and json.loads(other) != json.loads(alone)
    # a renamed copy with its own bundle, and a symbolic link to the snapshot, find theirs
    link = trained.parent / "latest.caffemodel"
    link.symlink_to(Path(weights))
    code, linked, _ = classify(capsys, f"--weights={link}", "--json", image)
    assert code == 0 and json.loads(linked)["top_k"] == json.loads(alone)["top_k"]


def test_bundle_lookup_and_a_bare_caffe_model(golden, tmp_path) -> None:
    assert bundle.bundle_candidates("d/snap_iter_300.caffemodel") == [
        Path("d/snap_iter_300.inference.json"), Path("d/snap.inference.json")]
    assert bundle.bundle_candidates("d/final.caffemodel") == [Path("d/final.inference.json")]
    with pytest.raises(ImagenetError, match=r"no inference bundle beside it .* give --model"):
        bundle.resolve_settings(str(golden / MINI / "det_iter_10.caffemodel"))
    bare = bundle.resolve_settings(str(golden / MINI / "det_iter_10.caffemodel"), model="m")
    assert (bare.raw_scale, bare.input_scale, bare.mean_file, bare.bundle) == (255.0, 1.0,
                                                                                None, None)


def test_a_given_mean_replaces_the_bundles_and_wrong_labels_are_left_out(golden, trained,
                                                                        tmp_path) -> None:
    weights = str(trained / "det_iter_10.caffemodel")
    s = bundle.resolve_settings(weights, mean_values=[1.0, 2.0, 3.0])
    assert s.mean_file is None and s.mean_values == [1.0, 2.0, 3.0] and s.input_scale == 0.02
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    path, notes = bundle.write_bundle(trained / "det", read_net_parameter(
        golden / MINI / "net.prototxt"), root=golden / MINI, labels=three)
    assert notes == [f"class names not recorded: {three} has 3 lines, the net 5 classes"]
    assert json.loads(path.read_text())["labels"] is None


def test_write_for_solver_uses_caffes_prefix_and_finds_the_labels(golden, tmp_path) -> None:
    for name in ("net.prototxt", "mean_64.binaryproto", "solver_det.prototxt"):
        shutil.copy(golden / MINI / name, tmp_path)
    (tmp_path / "synset_words.txt").write_text("".join(f"n0{i} thing {i}\n" for i in range(5)))
    path, notes = bundle.write_for_solver("solver_det.prototxt", root=tmp_path)
    assert path == tmp_path / "det.inference.json" and notes == []
    assert json.loads(path.read_text())["labels"] == "det.labels.txt"
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("det.*")}
    bundle.write_for_solver("solver_det.prototxt", root=tmp_path)  # unchanged: not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("det.*")} == before
