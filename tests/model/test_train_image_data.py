"""ImageData in `caffe train` / `caffe test`: a net reading an image listing trains exactly like the
same net reading convert_imageset's LMDB of those images (same pixels, same crops and mirrors,
so the same losses, snapshots and test outputs), and builds from its listing alone."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data.convert import convert_imageset
from model.caffemodel import load_caffemodel
from model.net import Net

IMAGE_LAYER = ('type: "ImageData" image_data_param {{ source: "list.txt" batch_size: {batch} '
               'root_folder: "images/" new_height: 12 new_width: 12 }}')
DATA_LAYER = 'type: "Data" data_param {{ source: "db" batch_size: {batch} backend: LMDB }}'
NET = """name: "TinyImages"
layer { name: "data" TRAIN_INPUT top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 10 mirror: true mean_value: 110 scale: 0.02 } }
layer { name: "data" TEST_INPUT top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 10 mean_value: 110 scale: 0.02 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc1" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
test_iter: 2 test_interval: 3 base_lr: 0.05 lr_policy: "fixed" display: 1 max_iter: 6
momentum: 0.9 weight_decay: 0.0005 snapshot: 6 snapshot_prefix: "tiny" random_seed: 3
"""


def make_run(dest: Path, input_layer: str) -> Path:
    """14 JPEGs of 16x13 (lossy, resized to 12x12 on reading: the decode path matters)."""
    (dest / "images").mkdir(parents=True)
    rng = np.random.default_rng(8)
    lines = []
    for i in range(14):
        img = rng.integers(0, 256, size=(13, 16, 3), dtype=np.uint8)
        img[:, :, i % 3] //= 3
        cv2.imwrite(str(dest / "images" / f"im{i}.jpg"), img)
        lines.append(f"im{i}.jpg {i % 3}\n")
    (dest / "list.txt").write_text("".join(lines))
    (dest / "net.prototxt").write_text(
        NET.replace("TRAIN_INPUT", input_layer.format(batch=4))
        .replace("TEST_INPUT", input_layer.format(batch=3)))
    (dest / "solver.prototxt").write_text(SOLVER)
    return dest


def test_image_data_trains_like_the_converted_lmdb(tmp_path) -> None:
    from model.train import evaluate, train

    images = make_run(tmp_path / "images_run", IMAGE_LAYER)
    lmdb = make_run(tmp_path / "lmdb_run", DATA_LAYER)
    convert_imageset(lmdb / "images", lmdb / "list.txt", lmdb / "db", resize_height=12,
                     resize_width=12, workers=1, show_progress=False)
    lines: list[str] = []
    a = train("solver.prototxt", workdir=images, log=lines.append)
    b = train("solver.prototxt", workdir=lmdb, log=lambda line: None)
    assert a.losses == b.losses and len(set(a.losses.values())) > 3
    assert a.final_test_outputs == b.final_test_outputs
    wa = load_caffemodel(images / "tiny_iter_6.caffemodel")
    wb = load_caffemodel(lmdb / "tiny_iter_6.caffemodel")
    assert wa.keys() == wb.keys() and len(wa["fc1"]) == 2
    assert all(np.array_equal(x, y) for k in wa for x, y in zip(wa[k], wb[k]))
    assert any("Restarting data prefetching from start." in line for line in lines)
    got = evaluate("net.prototxt", "tiny_iter_6.caffemodel", 2, workdir=images,
                   log=lambda line: None)
    want = evaluate("net.prototxt", "tiny_iter_6.caffemodel", 2, workdir=lmdb,
                    log=lambda line: None)
    assert got == want and set(got) == {"accuracy", "loss"}


def test_net_shapes_come_from_the_first_listed_image(tmp_path, monkeypatch) -> None:
    run = make_run(tmp_path, IMAGE_LAYER)
    monkeypatch.chdir(run)  # Caffe resolves sources against the working directory
    net = Net.from_prototxt(run / "net.prototxt", "TRAIN")
    assert net.inputs[0].shapes == ((4, 3, 10, 10), (4,))
    assert net.inputs[0].type == "ImageData"
