"""DataTransformer: the jitted device transform against a literal float64 rendering of Caffe's
loop, and against the goldens' checked batches (transform_check.json)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from data.datum import decode_datum_bytes
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader
from data.proto import caffe_pb2
from data.transform import TransformPlan, crop_uint8, reference_transform, transform_batch


def plan_for(text: str, *, train: bool, mean: np.ndarray | None = None) -> TransformPlan:
    tp = text_format.Parse(text, caffe_pb2.TransformationParameter())
    plan = TransformPlan.from_param(tp, train=train)
    if mean is not None:
        plan = TransformPlan(**{**plan.__dict__, "mean_file": mean})
    return plan


def run_device(plan: TransformPlan, imgs: np.ndarray, offs: np.ndarray, flips: np.ndarray
               ) -> np.ndarray:
    oh, ow = plan.output_hw(imgs.shape[2], imgs.shape[3])
    crops = np.stack([crop_uint8(im, o, (oh, ow)) for im, o in zip(imgs, offs)])
    fn = jax.jit(transform_batch, static_argnames="scale")
    return np.asarray(fn(crops, offs, flips, plan.mean_array(imgs.shape[1]), scale=plan.scale))


@pytest.mark.parametrize("text,train", [
    ("crop_size: 5 mirror: true", True),
    ("crop_size: 5 mirror: true scale: 0.5", False),
    ("mirror: true mean_value: 10 mean_value: 20 mean_value: 30", True),
    ("crop_size: 4 mean_value: 100 scale: 0.00390625", True),
    ("crop_size: 6 mirror: true", True),  # with a full-size mean file below
])
def test_device_transform_matches_caffe_loop(text: str, train: bool) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 3, 9, 11), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(3, 9, 11)).astype(np.float32) if "crop_size: 6" in text \
        else None
    plan = plan_for(text, train=train, mean=mean)
    offs, flips = plan.draw(np.random.default_rng(1), [9] * 6, [11] * 6)
    if plan.mirror:
        flips = np.array([True, False] * 3)  # both branches, whatever the draw
    got = run_device(plan, imgs, offs, flips)
    for j in range(6):
        want = reference_transform(imgs[j], offs[j], bool(flips[j]), plan)
        np.testing.assert_allclose(got[j], want, rtol=1e-6, atol=1e-5)


def test_offsets_train_random_test_centre() -> None:
    train = plan_for("crop_size: 5", train=True)
    offs, flips = train.draw(np.random.default_rng(3), [9] * 500, [11] * 500)
    assert offs[:, 0].min() == 0 and offs[:, 0].max() == 4  # rand(H - crop + 1)
    assert offs[:, 1].min() == 0 and offs[:, 1].max() == 6
    assert not flips.any()  # mirror off: never flipped
    test = plan_for("crop_size: 5 mirror: true", train=False)
    offs, flips = test.draw(np.random.default_rng(3), [9, 10], [11, 12])
    assert offs.tolist() == [[2, 3], [2, 3]]  # (H - crop) / 2
    offs, flips = test.draw(np.random.default_rng(3), [9] * 400, [11] * 400)
    assert 150 < flips.sum() < 250  # mirror applies in TEST too, p = 1/2


def test_mean_file_and_mean_value_are_exclusive(tmp_path) -> None:
    tp = text_format.Parse('mean_file: "m.binaryproto" mean_value: 1',
                           caffe_pb2.TransformationParameter())
    with pytest.raises(ImagenetError, match="cannot specify mean_file"):
        TransformPlan.from_param(tp, train=True, root=tmp_path)


def test_crop_larger_than_image_is_refused() -> None:
    plan = plan_for("crop_size: 20", train=True)
    with pytest.raises(ImagenetError, match="smaller than crop_size 20"):
        plan.check_image((3, 9, 11), "x")


def test_golden_test_batch_centre_crop_minus_mean(golden) -> None:
    """forward_blobs.npz:data == centre crop (offset 3,3) of val_64_lmdb minus mean_64, bitwise."""
    tp = text_format.Parse('crop_size: 57 mean_file: "mean_64.binaryproto"',
                           caffe_pb2.TransformationParameter())
    plan = TransformPlan.from_param(tp, train=False, root=golden)
    with LmdbReader(golden / "val_64_lmdb") as r:
        recs = [decode_datum_bytes(v) for _, v in list(r)[:4]]
    imgs = np.stack([c for c, _ in recs])
    offs, flips = plan.draw(np.random.default_rng(0), [64] * 4, [64] * 4)
    assert offs.tolist() == [[3, 3]] * 4
    got = run_device(plan, imgs, offs, flips)
    want = np.load(golden / "forward_blobs.npz")["data"]
    assert np.array_equal(got, want)


def test_golden_train_batch_minus_mean(golden) -> None:
    tp = text_format.Parse('mean_file: "mean_64.binaryproto"', caffe_pb2.TransformationParameter())
    plan = TransformPlan.from_param(tp, train=True, root=golden)
    with LmdbReader(golden / "train_64_lmdb") as r:
        recs = [decode_datum_bytes(v) for _, v in list(r)[:8]]
    imgs = np.stack([c for c, _ in recs])
    offs, flips = plan.draw(np.random.default_rng(0), [64] * 8, [64] * 8)
    got = run_device(plan, imgs, offs, flips)
    ref = np.load(golden / "sgd_step_batch.npz")
    assert np.array_equal(got, ref["data"])
    assert np.array_equal(np.array([l for _, l in recs], np.float32), ref["label"].astype(np.float32))
