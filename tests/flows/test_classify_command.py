"""`imagenet classify`: Caffe's classifier semantics (caffe.io.oversample's ten crops, centre crop,
mean, scales), checked against real Caffe's `caffe test` on the resnet-mini golden, plus the
inputs (folder, listing, bad files) and the one-line errors. In-process: main([...])."""
from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from data.proto import caffe_pb2
from flows.cli import main
from model.classify import Preprocess
from model.prototxt import filter_net, read_net_parameter

MINI = "resnet-mini"
CROP = 56


def oversample_reference(images: np.ndarray, crop_dims: tuple[int, int]) -> np.ndarray:
    """python/caffe/io.py oversample(), literally (images N x H x W x K)."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    h_indices = (0, im_shape[0] - crop_dims[0])
    w_indices = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    curr = 0
    for i in h_indices:
        for j in w_indices:
            crops_ix[curr] = (i, j, i + crop_dims[0], j + crop_dims[1])
            curr += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]  # flip for mirrors
    return crops


@pytest.mark.parametrize("image_hw, crop", [((256, 256), (227, 227)), ((64, 64), (57, 57)),
                                            ((9, 12), (4, 7))])
def test_crops_are_caffe_io_oversample(image_hw, crop) -> None:
    rng = np.random.default_rng(0)
    hwc = rng.standard_normal((*image_hw, 3)).astype(np.float32)
    pre = Preprocess(image_hw=image_hw, crop_hw=crop, channels=3, mean=None)
    got = pre.crops_of(hwc.transpose(2, 0, 1))
    want = oversample_reference(hwc[None], crop).transpose(0, 3, 1, 2)
    assert np.array_equal(got, want)
    centre = Preprocess(image_hw=image_hw, crop_hw=crop, channels=3, mean=None,
                        oversample=False).crops_of(hwc.transpose(2, 0, 1))
    assert np.array_equal(centre[0], want[4])  # classifier.py's centre_only crop


@pytest.fixture(scope="module")
def mini_deploy(golden, tmp_path_factory):
    """The resnet-mini TEST net as a deploy net: Input 1x3x56x56, ..., fc5, Softmax prob."""
    net = filter_net(read_net_parameter(golden / MINI / "net.prototxt"), "TEST")
    out = caffe_pb2.NetParameter(name=net.name)
    inp = out.layer.add(name="data", type="Input", top=["data"])
    inp.input_param.shape.add().dim.extend([1, 3, CROP, CROP])
    for layer in net.layer:
        if layer.type not in ("Data", "SoftmaxWithLoss", "Accuracy"):
            layer.ClearField("include")
            out.layer.append(layer)
    out.layer.add(name="prob", type="Softmax", bottom=["fc5"], top=["prob"])
    path = tmp_path_factory.mktemp("classify") / "deploy.prototxt"
    path.write_text(text_format.MessageToString(out))
    return path


def classify(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["classify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_centre_crop_scores_equal_caffe_test_on_the_golden(golden, mini_deploy, capsys) -> None:
    """--center_only on the 8 val photos: images resized to the mean's 64x64 like
    convert_imageset, centre 56 crop (offset 4), mean at the same offset, x 0.02 = what Caffe's
    TEST Data layer fed `caffe test` (caffe_test.log): its per-batch losses and accuracies."""
    expected = json.loads((golden / MINI / "expected.json").read_text())["caffe_test"]
    code, out, err = classify(
        capsys, f"--model={mini_deploy}", f"--weights={golden / MINI / 'det_iter_10.caffemodel'}",
        f"--mean={golden / MINI / 'mean_64.binaryproto'}", "--input_scale=0.02",
        "--center_only", "--top_k=5", "--json", f"--root_folder={golden}/val/",
        str(golden / "val.txt"))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    labels = [int(line.split()[1]) for line in (golden / "val.txt").read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == [
        line.split()[0] for line in (golden / "val.txt").read_text().splitlines()]
    prob = [{t["index"]: t["score"] for t in r["top_k"]} for r in rows]
    for b, batch in enumerate(expected["batches"]):
        idx = range(4 * b, 4 * b + 4)
        loss = -sum(math.log(prob[i][labels[i]]) for i in idx) / 4
        top1 = sum(max(prob[i], key=prob[i].get) == labels[i] for i in idx) / 4
        top3 = sum(labels[i] in sorted(prob[i], key=prob[i].get)[-3:] for i in idx) / 4
        assert loss == pytest.approx(batch["loss"], rel=1e-5), b  # Caffe printed 6 digits
        assert (top1, top3) == (batch["accuracy"], batch["accuracy_top3"])
    assert "top-1 2/8, top-5 8/8 of the listing's labels" in err


def test_ten_crops_folders_skips_and_labels(golden, mini_deploy, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(golden / "val", photos)
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {c}\n" for c in "abcde"))
    weights = golden / MINI / "det_iter_10.caffemodel"
    code, out, err = classify(
        capsys, "--model", str(mini_deploy), "--weights", str(weights),
        "--mean", str(golden / MINI / "mean_64.binaryproto"), "--input_scale", "0.02",
        "--labels", str(names), "--top_k", "2", "--batch_size", "3", str(photos))
    assert code == 0
    blocks = out.strip().split("\n")
    assert len(blocks) == 8 * 3  # 8 photos x (path + 2 classes); notes.txt is not looked at
    assert blocks[0].endswith("ILSVRC2012_val_00000001.JPEG")
    assert all(line.endswith('"') and ' - "class ' in line for line in blocks[1:3])
    assert "skipped" in err and "broken.jpg" in err and "classified 8 of 9 images (10 crops" in err
    # ten crops are not the centre crop: the averaged scores differ
    _, centre, _ = classify(capsys, f"--model={mini_deploy}", f"--weights={weights}",
                            f"--mean={golden / MINI / 'mean_64.binaryproto'}",
                            "--input_scale=0.02", f"--labels={names}", "--top_k=2",
                            "--center_only", str(photos / "ILSVRC2012_val_00000001.JPEG"))
    assert centre.splitlines()[1] != blocks[1]


def test_one_line_errors(golden, mini_deploy, tmp_path, capsys) -> None:
    weights = str(golden / MINI / "det_iter_10.caffemodel")
    image = str(golden / "val" / "ILSVRC2012_val_00000001.JPEG")
    model = f"--model={mini_deploy}"
    code, _, err = classify(capsys, model, f"--weights={weights}", "--mean_value=1,2,3",
                            f"--mean={golden / MINI / 'mean_64.binaryproto'}", image)
    assert code == 1 and "give --mean or --mean_value, not both" in err
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    code, _, err = classify(capsys, model, f"--weights={weights}", f"--labels={three}", image)
    assert code == 1 and "has 3 labels but 'prob' has 5 outputs" in err
    code, _, err = classify(capsys, model, f"--weights={weights}", "--mean_value=1,2", image)
    assert code == 1 and "--mean_value has 2 values for a 3-channel input" in err
    code, _, err = classify(capsys, model, f"--weights={weights}", "--images_dim=40,40", image)
    assert code == 1 and "larger than the images after resizing (40x40)" in err
    code, _, err = classify(capsys, model, f"--weights={golden / 'alexmini_iter_10.caffemodel'}",
                            image)
    assert code == 1 and "Incompatible number of blobs for layer conv1" in err
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(caffe_pb2.NetParameter(name="other").SerializeToString())
    code, _, err = classify(capsys, model, f"--weights={empty}", image)
    assert code == 1 and "holds no layers" in err
    other = tmp_path / "other.caffemodel"
    other.write_bytes(caffe_pb2.NetParameter(name="other", layer=[caffe_pb2.LayerParameter(
        name="data", type="Input")]).SerializeToString())
    code, _, err = classify(capsys, model, f"--weights={other}", image)
    assert code == 1 and "has no weights for layer(s) 'conv1', 'bn_conv1', 'scale_conv1'" in err
    code, _, err = classify(capsys, model, f"--weights={weights}", str(tmp_path / "nope.jpg"))
    assert code == 1 and "no such file or folder" in err and "no images to classify" in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()[:20])
    code, out, err = classify(capsys, model, f"--weights={weights}", "--json", str(bad))
    assert code == 1 and json.loads(out)["image"] == str(bad) and "error" in json.loads(out)
