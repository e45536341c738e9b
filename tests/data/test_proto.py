"""The committed caffe_pb2.py matches caffe.proto, and the schema is wire-compatible with Caffe."""
from __future__ import annotations

from pathlib import Path

from data.proto import caffe_pb2
from data.proto.generate import PROTO_DIR, generate


def test_committed_module_is_current(tmp_path: Path) -> None:
    fresh = generate(tmp_path).read_bytes()
    committed = (PROTO_DIR / "caffe_pb2.py").read_bytes()
    assert fresh == committed, "data/proto/caffe_pb2.py is stale: run `make proto` and commit it"


def test_field_numbers_of_caffe_records() -> None:
    def numbers(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(caffe_pb2.Datum) == {
        "channels": 1, "height": 2, "width": 3, "data": 4, "label": 5,
        "float_data": 6, "encoded": 7,
    }
    assert numbers(caffe_pb2.BlobProto) == {
        "shape": 7, "data": 5, "diff": 6, "double_data": 8, "double_diff": 9,
        "num": 1, "channels": 2, "height": 3, "width": 4,
    }
    assert numbers(caffe_pb2.SolverState) == {
        "iter": 1, "learned_net": 2, "history": 3, "current_step": 4,
    }
    assert numbers(caffe_pb2.NetParameter)["layer"] == 100
    assert numbers(caffe_pb2.NetParameter)["layers"] == 2


def test_caffe_snapshot_round_trips_byte_for_byte(golden: Path) -> None:
    for name in ("alexmini_iter_10.caffemodel", "alexmini_iter_10.solverstate"):
        raw = (golden / name).read_bytes()
        message = caffe_pb2.NetParameter() if name.endswith(".caffemodel") else caffe_pb2.SolverState()
        message.ParseFromString(raw)
        assert message.SerializeToString() == raw, name
