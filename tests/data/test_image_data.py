"""The ImageData pipeline (image_data_layer.cpp): the pixels of convert_imageset's records, listing
order with wrap, reproducible shuffle per epoch and rand_skip, and the loud failures."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from data.datum import decode_datum_bytes
from data.errors import ImagenetError
from data.image_data import ImageDataSource, first_image_chw
from data.lmdb_io import LmdbReader
from data.pipeline import open_source
from data.proto import caffe_pb2


def layer(source: str, batch: int, image: str = "", transform: str = "") -> caffe_pb2.LayerParameter:
    return text_format.Parse(
        f'name: "data" type: "ImageData" top: "data" top: "label" '
        f'transform_param {{ {transform} }} '
        f'image_data_param {{ source: "{source}" batch_size: {batch} {image} }}',
        caffe_pb2.LayerParameter())


def make_images(folder, n: int, hw: int = 10) -> list[np.ndarray]:
    """n PNGs (lossless: decoded pixels = written ones) img_<i>.png, label i % 3, and list.txt."""
    rng = np.random.default_rng(3)
    imgs = []
    lines = []
    for i in range(n):
        hwc = rng.integers(0, 256, size=(hw, hw, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img_{i}.png"), hwc)
        imgs.append(hwc.transpose(2, 0, 1))
        lines.append(f"img_{i}.png {i % 3}\n")
    (folder / "list.txt").write_text("".join(lines))
    return imgs


def lmdb_records(path) -> list[tuple[np.ndarray, int]]:
    with LmdbReader(path) as reader:
        return [decode_datum_bytes(v) for _, v in reader]


def test_golden_pixels_are_convert_imageset_records(golden) -> None:
    """ImageData with new_height/new_width 64 reads exactly train_64_lmdb (Caffe's records of the
    same listing: convert_imageset --resize_height=64 --resize_width=64), in listing order and
    wrapping after 25 like Caffe's lines_id_."""
    records = lmdb_records(golden / "train_64_lmdb")
    lp = layer(str(golden / "train.txt"), 8, f'root_folder: "{golden}/train/" '
               "new_height: 64 new_width: 64")
    with open_source(lp, train=True, seed=0) as src:
        assert isinstance(src, ImageDataSource) and len(src) == 25
        for index in (0, 3):
            b = src.batch(index)
            want = [records[i % 25] for i in range(index * 8, index * 8 + 8)]
            assert np.array_equal(b.images, np.stack([r[0] for r in want]))
            assert b.labels.tolist() == [float(r[1]) for r in want]
        assert src.wrapped(3) and not src.wrapped(0)


def test_golden_gray_pixels(golden) -> None:
    """is_color: false = convert_imageset --gray (train_gray_lmdb, 256x256)."""
    records = lmdb_records(golden / "train_gray_lmdb")
    lp = layer(str(golden / "train.txt"), 5, f'root_folder: "{golden}/train" is_color: false '
               "new_height: 256 new_width: 256")
    src = ImageDataSource(lp, train=False, seed=0)
    assert np.array_equal(src.batch(0).images, np.stack([r[0] for r in records[:5]]))
    assert first_image_chw(lp) == (1, 256, 256)


def test_transform_and_first_image_shape(tmp_path) -> None:
    imgs = make_images(tmp_path, 4, hw=10)
    lp = layer("list.txt", 2, transform="crop_size: 6 mean_value: 100")
    assert first_image_chw(lp, root=tmp_path) == (3, 10, 10)
    src = ImageDataSource(lp, train=False, seed=0, root=tmp_path)
    b = src.batch(1)
    # TEST crop: centre offset (10 - 6) / 2 = 2, uint8 crop on the host
    assert b.offsets.tolist() == [[2, 2], [2, 2]]
    assert np.array_equal(b.images, np.stack([im[:, 2:8, 2:8] for im in imgs[2:4]]))
    assert b.labels.tolist() == [2.0, 0.0]


def test_shuffle_is_reproducible_per_epoch_and_rand_skip_shifts_the_start(tmp_path) -> None:
    make_images(tmp_path, 7, hw=4)
    lp = layer("list.txt", 3, "shuffle: true")
    a = ImageDataSource(lp, train=True, seed=5, root=tmp_path)
    b = ImageDataSource(lp, train=True, seed=5, root=tmp_path)
    c = ImageDataSource(lp, train=True, seed=6, root=tmp_path)
    orders = [a.order(e) for e in range(3)]
    for perm in orders:  # every epoch reads every line once
        assert sorted(perm.tolist()) == list(range(7))
    assert len({tuple(p) for p in orders}) > 1  # reshuffled at the wrap, as Caffe does
    assert all(np.array_equal(a.order(e), b.order(e)) for e in range(3))
    assert any(not np.array_equal(a.order(e), c.order(e)) for e in range(3))
    # batch 2 = positions 6, 7, 8: the last of epoch 0, then the first two of epoch 1
    assert a.entry_indices(2) == [int(orders[0][6]), int(orders[1][0]), int(orders[1][1])]
    assert np.array_equal(a.batch(2).images, b.batch(2).images)
    plain = ImageDataSource(layer("list.txt", 3), train=True, seed=5, root=tmp_path)
    assert plain.entry_indices(2) == [6, 0, 1]
    skipping = [ImageDataSource(layer("list.txt", 3, "rand_skip: 5"), train=True, seed=s,
                                root=tmp_path) for s in range(6)]
    skips = {s.skip for s in skipping}
    assert skips <= set(range(5)) and len(skips) > 1
    for s in skipping:
        assert s.entry_indices(0) == [(s.skip + j) % 7 for j in range(3)]
        assert s.skip == ImageDataSource(layer("list.txt", 3, "rand_skip: 5"), train=True,
                                         seed=s.seed, root=tmp_path).skip


def test_missing_files_are_named_when_the_layer_opens(tmp_path) -> None:
    make_images(tmp_path, 3, hw=4)
    with (tmp_path / "list.txt").open("a") as f:
        f.write("gone_a.png 1\ngone_b.png 2\n")
    with pytest.raises(ImagenetError, match=r"list.txt: 2 of 5 listed images not found .*"
                                            r"line 4 'gone_a.png', line 5 'gone_b.png'"):
        ImageDataSource(layer("list.txt", 2), train=True, seed=0, root=tmp_path)


def test_undecodable_image_names_its_listing_line(tmp_path) -> None:
    make_images(tmp_path, 2, hw=4)
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 100)
    with (tmp_path / "list.txt").open("a") as f:
        f.write("junk.jpg 0\n")
    src = ImageDataSource(layer("list.txt", 3), train=True, seed=0, root=tmp_path)
    with pytest.raises(ImagenetError, match=r"list.txt:3: cannot load .*junk.jpg: OpenCV could "
                                            r"not decode"):
        src.batch(0)


@pytest.mark.parametrize("image, transform, message", [
    ("new_height: 8", "", "must be set together"),
    ("crop_size: 4", "", "image_data_param crop_size is ignored by Caffe's ImageData layer"),
    ("", "mean_value: 1 mean_file: 'm.binaryproto'", "cannot specify mean_file"),
])
def test_bad_parameters_fail_with_one_clear_line(tmp_path, image, transform, message) -> None:
    make_images(tmp_path, 2, hw=4)
    lp = layer("list.txt", 2, image, transform)
    with pytest.raises(ImagenetError, match=message):
        ImageDataSource(lp, train=True, seed=0, root=tmp_path)


def test_bad_listings(tmp_path) -> None:
    make_images(tmp_path, 2, hw=4)
    with pytest.raises(ImagenetError, match="batch_size must be >= 1"):
        ImageDataSource(layer("list.txt", 0), train=True, seed=0, root=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ImagenetError, match="is empty"):
        ImageDataSource(layer("empty.txt", 1), train=True, seed=0, root=tmp_path)
    (tmp_path / "nolabel.txt").write_text("a.png\n")
    with pytest.raises(ImagenetError, match=r"nolabel.txt:1: expected '<path> <label>'"):
        ImageDataSource(layer("nolabel.txt", 1), train=True, seed=0, root=tmp_path)
    with pytest.raises(ImagenetError, match="rand_skip drew"):
        for seed in range(20):  # some seed draws a skip >= 2 lines
            ImageDataSource(layer("list.txt", 1, "rand_skip: 50"), train=True, seed=seed,
                            root=tmp_path)
