"""data.datum: Datum, BlobProto <-> numpy; fast paths equal caffe_pb2; Caffe files read exactly."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from data.datum import (
    array_to_blobproto, array_to_datum, blobproto_bytes, blobproto_to_array, datum_to_array, decode_datum_bytes,
    encode_datum_bytes, encoded_datum_bytes, parse_datum_header, read_blobproto, read_proto_file,
    write_blobproto,
)
from data.errors import ImagenetError
from data.proto import caffe_pb2

GOLDEN_LMDBS = ["train_lmdb", "val_lmdb", "train_gray_lmdb", "train_64_lmdb", "val_64_lmdb",
                "bad_lmdb", "train_encoded_lmdb", "train_encoded_raw_lmdb"]


def _golden_records(golden: Path, name: str) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(golden / name), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    env.close()
    return records


@pytest.mark.parametrize("name", GOLDEN_LMDBS)
def test_fast_paths_agree_with_protobuf_on_caffe_records(golden: Path, name: str) -> None:
    for key, value in _golden_records(golden, name):
        datum = caffe_pb2.Datum()
        datum.ParseFromString(value)
        arr, label = decode_datum_bytes(value)
        assert label == datum.label
        assert np.array_equal(arr, datum_to_array(datum)), key
        if datum.encoded:
            assert encoded_datum_bytes(datum.data, datum.label) == value, key
            native = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert arr.shape[1:] == native.shape[:2]
        else:
            assert arr.shape == (datum.channels, datum.height, datum.width)
            assert arr.tobytes() == datum.data
            # Our serialization of the same pixels is Caffe's record, byte for byte.
            assert encode_datum_bytes(arr, label) == value, key
            assert array_to_datum(arr, label).SerializeToString() == value, key


def test_raw_decode_is_a_view_without_copy() -> None:
    chw = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    value = encode_datum_bytes(chw, 7)
    arr, label = decode_datum_bytes(value)
    assert label == 7 and np.array_equal(arr, chw)
    assert not arr.flags.owndata and not arr.flags.writeable  # a view of `value`


@pytest.mark.parametrize("layout", ["chw", "hwc_view", "strided"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_encode_matches_protobuf_for_every_layout(layout: str, channels: int) -> None:
    # convert_imageset passes an HxWxC image seen as CxHxW (split by OpenCV); other callers
    # pass contiguous or arbitrarily strided arrays (numpy's copy). Same bytes either way.
    hwc = np.random.default_rng(channels).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    chw = {"chw": np.ascontiguousarray(hwc.transpose(2, 0, 1)),
           "hwc_view": hwc.transpose(2, 0, 1),
           "strided": hwc.transpose(2, 0, 1)[:, ::-1, ::2]}[layout]
    assert encode_datum_bytes(chw, 4) == array_to_datum(chw, 4).SerializeToString()


@pytest.mark.parametrize("label", [0, 1, 999, 2**31 - 1, -1, -(2**31)])
def test_labels_round_trip_including_negative(label: int) -> None:
    chw = np.full((1, 2, 2), 200, np.uint8)
    value = encode_datum_bytes(chw, label)
    assert value == array_to_datum(chw, label).SerializeToString()
    assert decode_datum_bytes(value)[1] == label
    assert parse_datum_header(value).label == label


def test_float_data_packed_and_unpacked() -> None:
    values = np.array([[[1.5, -2.0]], [[3.25, 0.0]]], np.float32)
    datum = array_to_datum(values, 3)
    assert len(datum.float_data) == 4 and not datum.data
    arr, label = decode_datum_bytes(datum.SerializeToString())
    assert arr.dtype == np.float32 and np.array_equal(arr, values) and label == 3
    # caffe.proto's float_data is unpacked (proto2 default); a packed writer must read too.
    packed = (b"\x08\x02\x10\x01\x18\x02" + b"\x32\x10" + values.astype("<f4").tobytes()
              + b"\x28\x03")
    arr, label = decode_datum_bytes(packed)
    assert np.array_equal(arr, values) and label == 3


def test_encoded_datum_decodes_natively_or_in_colour(tmp_path: Path) -> None:
    gray = (np.arange(48 * 64) % 251).astype(np.uint8).reshape(48, 64)
    ok, png = cv2.imencode(".png", gray)
    value = encoded_datum_bytes(png.tobytes(), 2)
    native, label = decode_datum_bytes(value)
    assert label == 2 and native.shape == (1, 48, 64) and np.array_equal(native[0], gray)
    colour, _ = decode_datum_bytes(value, force_color=True)
    assert colour.shape == (3, 48, 64) and all(np.array_equal(c, gray) for c in colour)
    with pytest.raises(ImagenetError, match="could not decode"):
        decode_datum_bytes(encoded_datum_bytes(b"not an image", 0))


def test_corrupt_records_raise_clear_errors() -> None:
    value = encode_datum_bytes(np.zeros((3, 4, 4), np.uint8), 1)
    with pytest.raises(ImagenetError, match="corrupt Datum"):
        decode_datum_bytes(value[:-3])
    wrong_size = caffe_pb2.Datum(channels=3, height=4, width=4, data=b"\x00" * 10)
    with pytest.raises(ImagenetError, match="10 bytes.*3x4x4 = 48"):
        decode_datum_bytes(wrong_size.SerializeToString())
    with pytest.raises(ImagenetError, match=r"\(C,H,W\)"):
        encode_datum_bytes(np.zeros((4, 4), np.uint8), 0)


def test_caffe_mean_binaryproto_reads_exactly(golden: Path) -> None:
    for proto, npy in [("mean.binaryproto", "mean.npy"), ("mean_64.binaryproto", "mean_64.npy")]:
        mean = read_blobproto(golden / proto)
        ref = np.load(golden / npy)  # caffe.io.blobproto_to_array, by pycaffe
        assert mean.dtype == np.float32 and mean.shape == ref.shape
        assert np.array_equal(mean, ref)


def test_write_blobproto_is_caffes_file_byte_for_byte(golden: Path, tmp_path: Path) -> None:
    mean = read_blobproto(golden / "mean_64.binaryproto")
    out = tmp_path / "mean.binaryproto"
    write_blobproto(out, mean[0])  # (C,H,W) -> legacy num=1, as compute_image_mean writes
    assert out.read_bytes() == (golden / "mean_64.binaryproto").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.binaryproto"]  # no temp left


def test_blobproto_shape_forms() -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    legacy = array_to_blobproto(arr)
    assert (legacy.num, legacy.channels, legacy.height, legacy.width) == (1, 2, 3, 4)
    assert not legacy.shape.dim
    assert blobproto_to_array(legacy).shape == (1, 2, 3, 4)
    modern = array_to_blobproto(arr, legacy_4d=False)
    assert list(modern.shape.dim) == [2, 3, 4] and not modern.HasField("num")
    assert np.array_equal(blobproto_to_array(modern), arr)
    # The message built from wire bytes equals one filled field by field.
    slow = caffe_pb2.BlobProto()
    slow.shape.dim.extend([2, 3, 4])
    slow.data.extend(arr.ravel().tolist())
    assert slow.SerializeToString() == modern.SerializeToString()
    # write_blobproto's bytes (no protobuf message) are protobuf's own serialization.
    assert blobproto_bytes(arr, legacy_4d=False) == slow.SerializeToString()
    assert blobproto_bytes(arr) == legacy.SerializeToString()
    doubles = caffe_pb2.BlobProto()
    doubles.shape.dim.append(2)
    doubles.double_data.extend([0.5, 1.5])
    assert np.array_equal(blobproto_to_array(doubles), np.array([0.5, 1.5], np.float32))
    bad = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2)
    bad.data.extend([1.0])
    with pytest.raises(ImagenetError, match="holds 1 values but its shape"):
        blobproto_to_array(bad)


def test_read_blobproto_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk.binaryproto"
    path.write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ImagenetError, match="junk.binaryproto"):
        read_blobproto(path)


def test_golden_json_describes_what_we_read(golden: Path) -> None:
    meta = json.loads((golden / "train_gray_lmdb.json").read_text())
    records = _golden_records(golden, "train_gray_lmdb")
    assert len(records) == meta["count"]
    for (key, value), rec in zip(records, meta["records"]):
        arr, label = decode_datum_bytes(value)
        assert key.decode() == rec["key"] and label == rec["label"]
        assert arr.shape == (rec["channels"], rec["height"], rec["width"])


def test_read_proto_file_names_the_file_and_what_is_wrong(tmp_path):
    good = tmp_path / "state.solverstate"
    good.write_bytes(caffe_pb2.SolverState(iter=7, current_step=2).SerializeToString())
    state = read_proto_file(good, caffe_pb2.SolverState(), "solverstate", "SolverState")
    assert (state.iter, state.current_step) == (7, 2)
    with pytest.raises(ImagenetError, match=r"nope\.solverstate: no such solverstate file"):
        read_proto_file(tmp_path / "nope.solverstate", caffe_pb2.SolverState(), "solverstate",
                        "SolverState")
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff")  # a truncated varint: not a NetParameter
    with pytest.raises(ImagenetError, match=r"bad\.caffemodel: not a binary caffemodel"):
        read_proto_file(bad, caffe_pb2.NetParameter(), "caffemodel", "caffemodel (NetParameter)")
