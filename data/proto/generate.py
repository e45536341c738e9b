"""Regenerate caffe_pb2.py from caffe.proto with protoc (grpcio-tools); run by `make proto`.

The generated module is committed; tests/data/test_proto.py regenerates it into a temporary
folder and fails when the committed file is stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "caffe.proto"


def generate(out_dir: Path = PROTO_DIR) -> Path:
    """Run protoc on caffe.proto, writing caffe_pb2.py into out_dir; return its path."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", str(PROTO_FILE)]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE} (exit status {status})")
    return out_dir / "caffe_pb2.py"


if __name__ == "__main__":
    print(f"wrote {generate()}")
    sys.exit(0)
