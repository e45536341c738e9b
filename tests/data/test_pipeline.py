"""The Data pipeline: key order, wrap-around, pure batches per (seed, index), prefetch order,
encoded records and force_gray."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from data.datum import encode_datum_bytes, encoded_datum_bytes
from data.errors import ImagenetError
from data.lmdb_io import LmdbWriter
from data.pipeline import DataSource, Prefetcher
from data.proto import caffe_pb2


def make_lmdb(path, n: int, *, encoded: bool = False, hw: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    imgs = []
    with LmdbWriter(path) as w:
        for i in range(n):
            chw = rng.integers(0, 256, size=(3, hw, hw), dtype=np.uint8)
            imgs.append(chw)
            if encoded:
                ok, png = cv2.imencode(".png", chw.transpose(1, 2, 0))
                w.put(f"{i:08d}_x".encode(), encoded_datum_bytes(png.tobytes(), i % 3))
            else:
                w.put(f"{i:08d}_x".encode(), encode_datum_bytes(chw, i % 3))
    return imgs


def layer(source: str, batch: int, transform: str = "") -> caffe_pb2.LayerParameter:
    return text_format.Parse(
        f'name: "data" type: "Data" top: "data" top: "label" '
        f'transform_param {{ {transform} }} '
        f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }}',
        caffe_pb2.LayerParameter())


def test_batches_read_in_key_order_and_wrap(tmp_path) -> None:
    imgs = make_lmdb(tmp_path / "db", 5)
    src = DataSource(layer("db", 3), train=True, seed=1, root=tmp_path)
    b0, b1 = src.batch(0), src.batch(1)
    assert np.array_equal(b0.images, np.stack(imgs[:3]))
    # records 3, 4, then wrap to 0 as Caffe's DataReader does
    assert np.array_equal(b1.images, np.stack([imgs[3], imgs[4], imgs[0]]))
    assert b1.labels.tolist() == [0.0, 1.0, 0.0] and b1.wrapped and not b0.wrapped


def test_batch_is_pure_function_of_seed_and_index(tmp_path) -> None:
    make_lmdb(tmp_path / "db", 7)
    lp = layer("db", 4, "crop_size: 8 mirror: true")
    a = DataSource(lp, train=True, seed=42, root=tmp_path)
    b = DataSource(lp, train=True, seed=42, root=tmp_path)
    c = DataSource(lp, train=True, seed=43, root=tmp_path)
    for i in (0, 5, 3):  # any order, any index
        x, y = a.batch(i), b.batch(i)
        assert np.array_equal(x.images, y.images) and np.array_equal(x.offsets, y.offsets)
        assert np.array_equal(x.mirror, y.mirror)
    draws = [tuple(c.batch(i).offsets.ravel()) for i in range(4)]
    assert draws != [tuple(a.batch(i).offsets.ravel()) for i in range(4)]


def test_parts_of_a_batch_are_its_rows_with_the_same_draws(tmp_path) -> None:
    """Multi-process training: part p of P of a global batch is exactly those rows of the batch
    one process reads (records, crops, mirrors, labels), wrap-around included."""
    make_lmdb(tmp_path / "db", 7)
    lp = layer("db", 4, "crop_size: 8 mirror: true")
    whole = DataSource(lp, train=True, seed=42, root=tmp_path)
    for parts in (2, 4):
        srcs = [DataSource(lp, train=True, seed=42, root=tmp_path) for _ in range(parts)]
        for p, s in enumerate(srcs):
            s.read_part(p, parts)
        for i in (0, 1, 5):
            want = whole.batch(i)
            got = [s.batch(i) for s in srcs]
            for field in ("images", "offsets", "mirror", "labels"):
                assert np.array_equal(np.concatenate([getattr(g, field) for g in got]),
                                      getattr(want, field)), (parts, i, field)
            assert {g.wrapped for g in got} == {want.wrapped}
    assert len({tuple(whole.batch(i).offsets.ravel()) for i in range(4)}) > 1  # really random
    with pytest.raises(ImagenetError, match="cannot read part 0 of 3 of a batch of 4"):
        whole.read_part(0, 3)


def test_prefetcher_yields_consecutive_batches_from_any_start(tmp_path) -> None:
    make_lmdb(tmp_path / "db", 6)
    src = DataSource(layer("db", 4, "crop_size: 8"), train=True, seed=3, root=tmp_path)
    pf = Prefetcher(src, start=7, depth=2)
    try:
        got = [next(pf) for _ in range(3)]
    finally:
        pf.close()
    assert [b.index for b in got] == [7, 8, 9]
    for b in got:
        want = src.batch(b.index)
        assert np.array_equal(b.images, want.images) and np.array_equal(b.offsets, want.offsets)


def test_encoded_records_decode_and_force_gray(tmp_path) -> None:
    imgs = make_lmdb(tmp_path / "enc", 3, encoded=True)
    src = DataSource(layer("enc", 3), train=False, seed=0, root=tmp_path)
    assert np.array_equal(src.batch(0).images, np.stack(imgs))
    gray = DataSource(layer("enc", 3, "force_gray: true"), train=False, seed=0, root=tmp_path)
    g = gray.batch(0).images
    assert g.shape == (3, 1, 12, 12)
    want = cv2.cvtColor(imgs[0].transpose(1, 2, 0), cv2.COLOR_BGR2GRAY)
    assert np.abs(g[0, 0].astype(int) - want.astype(int)).max() <= 1


def test_missing_source_names_the_path(tmp_path) -> None:
    with pytest.raises(ImagenetError, match="nope"):
        DataSource(layer("nope", 2), train=True, seed=0, root=tmp_path)


def test_golden_train_lmdb_batches_like_caffe(golden) -> None:
    """batch i = records (i*8 .. i*8+7) mod 25 of train_64_lmdb (README section 6)."""
    with DataSource(layer("train_64_lmdb", 8), train=True, seed=0, root=golden) as src:
        assert len(src) == 25
        assert src.record_indices(3).tolist() == [24, 0, 1, 2, 3, 4, 5, 6]
        ref = np.load(golden / "sgd_step_batch.npz")
        assert np.array_equal(src.batch(0).labels, ref["label"].astype(np.float32))
