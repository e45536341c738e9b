"""The bad-input corpus: every `imagenet` command fed broken and hostile input.

Each case runs the command in-process (flows.cli.main) in a copy of a small workspace and
asserts the error contract (flows/cli.py): the exit code; ONE error line,
`imagenet <command>: error: ...`, naming the culprit (file:line, record key, flag) and, where
it is not obvious, what to do; no traceback; and the workspace exactly as it was (nothing
changed, created or deleted: the target of a failed command included). Cases that could kill
the process (SIGBUS or SIGABRT on a truncated or corrupt LMDB) or need a read-only or full disk run as
subprocesses, the disks in a private mount namespace (`unshare`), skipped loudly where the
machine cannot make one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import image_bombs
import numpy as np
import pytest

from data.datum import encode_datum_bytes, encoded_datum_bytes
from data.lmdb_io import LmdbWriter
from flows.cli import EXIT_BUG, EXIT_ERROR, EXIT_USAGE, main
from flows.commands import COMMANDS

REPO = Path(__file__).resolve().parents[2]
USAGE, ERROR = EXIT_USAGE, EXIT_ERROR
CLASSES = 4

NET = """name: "Corpus"
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { crop_size: 6 } data_param { source: "db" batch_size: 3 backend: LMDB } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
base_lr: 0.01
lr_policy: "fixed"
max_iter: 2
snapshot_prefix: "snap"
random_seed: 3
"""


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _db(path: Path, labels: list[int], shapes: list[tuple[int, int, int]] | None = None) -> None:
    rng = np.random.default_rng(0)
    with LmdbWriter(path) as writer:
        for i, label in enumerate(labels):
            shape = shapes[i] if shapes else (3, 8, 8)
            img = rng.integers(0, 256, size=shape, dtype=np.uint8)
            writer.put(f"{i:08d}_img{i}.jpg".encode(), encode_datum_bytes(img, label))


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """images/ + list.txt, an LMDB `db` of 6 records (labels 0..3), a tiny net and solver, a
    good tar: what the cases break, one thing each."""
    ws = tmp_path_factory.mktemp("corpus") / "ws"
    (ws / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (12, 16, 3), np.uint8))
        (ws / "images" / name).write_bytes(buf.tobytes())
    (ws / "list.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 2\n")
    _db(ws / "db", [i % CLASSES for i in range(6)])
    (ws / "net.prototxt").write_text(NET)
    (ws / "solver.prototxt").write_text(SOLVER)
    (ws / "ok.tar").write_bytes(_tar([("a/b.JPEG", b"x")]))
    (ws / "out").mkdir()
    _weights(ws / "w.caffemodel")
    return ws


def _weights(path: Path) -> None:
    """Initial weights of NET, for the `test` cases."""
    import jax

    from model.caffemodel import save_caffemodel
    from model.net import Net
    from model.prototxt import parse_net_text

    net = Net(parse_net_text(NET), "TEST", input_shapes={"data": (3, 3, 6, 6), "label": (3,)})
    save_caffemodel(path, net, net.init(jax.random.PRNGKey(0)))


DEPLOY = """name: "Corpus"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _cut_weights(rel: str, keep: int) -> Callable[[Path], None]:
    """w.caffemodel cut at a layer boundary: its name and first `keep` layers, which is a
    prefix of the file's bytes that still parses."""
    def setup(ws: Path) -> None:
        from data.proto import caffe_pb2

        full = (ws / "w.caffemodel").read_bytes()
        net = caffe_pb2.NetParameter.FromString(full)
        cut = caffe_pb2.NetParameter(name=net.name, layer=net.layer[:keep]).SerializeToString()
        assert full.startswith(cut) and len(cut) < len(full)
        (ws / rel).write_bytes(cut)
    return setup


def _snapshot(solverstate: bytes | None = None, caffemodel: str = "w.caffemodel"
              ) -> Callable[[Path], None]:
    """A Caffe-written snapshot (no resume side file): s_iter_1.solverstate naming
    `caffemodel`, or the given solverstate bytes."""
    def setup(ws: Path) -> None:
        from model.snapshot import solverstate_bytes

        state = solverstate if solverstate is not None else solverstate_bytes(
            1, caffemodel, [np.zeros((4, 108), np.float32), np.zeros(4, np.float32)], 0)
        (ws / "s_iter_1.solverstate").write_bytes(state)
    return setup


def _solverstate_without(field: str) -> bytes:
    from data.proto import caffe_pb2
    from model.snapshot import solverstate_bytes

    state = caffe_pb2.SolverState.FromString(solverstate_bytes(
        1, "w.caffemodel", [np.zeros((4, 108), np.float32), np.zeros(4, np.float32)], 0))
    if field == "history":
        del state.history[1:]
    else:
        state.ClearField(field)
    return state.SerializeToString()


def state(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, size and content digest (files), link target (links)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            elif name == "lock.mdb":
                out[rel] = ("file",)  # LMDB's reader table: not content
            else:
                out[rel] = ("file", path.stat().st_size,
                            hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: int
    names: tuple[str, ...]  # what the error line must say (the culprit; what to do)
    setup: Callable[[Path], None] | None = None  # break something first


def _write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _lmdb(rel: str, labels: list[int], shapes=None) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        shutil.rmtree(ws / rel, ignore_errors=True)
        _db(ws / rel, labels, shapes)
    return setup


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for step in steps:
            step(ws)
    return setup


def _truncate(rel: str, size: int) -> Callable[[Path], None]:
    return lambda ws: os.truncate(ws / rel, size)


def _corrupt_header_tar(ws: Path) -> None:
    payload = bytearray(_tar([(f"f{i}.JPEG", bytes([i]) * 600) for i in range(3)]))
    payload[2 * 1536:2 * 1536 + 8] = b"garbage!"  # the third member's header
    (ws / "bad.tar").write_bytes(bytes(payload))


def _gz(ws: Path) -> None:
    import gzip

    packed = gzip.compress(_tar([("a.JPEG", os.urandom(4000))]))
    (ws / "cut.tar.gz").write_bytes(packed[:len(packed) // 2])


def _symlink_tar(ws: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("link.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (ws / "link.tar").write_bytes(buf.getvalue())


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONVERT = ["convert-imageset", "images/", "list.txt"]
MEAN = ["compute-image-mean"]
TRAIN = ["train", "--solver=solver.prototxt"]

CASES = [
    # ---- convert-imageset
    Case("convert-nul-in-listing", CONVERT + ["new_db"], ERROR, ("list.txt:2", "NUL byte"),
         _write("list.txt", "a.jpg 0\nb\0.jpg 1\n")),
    Case("convert-label-above-int32", CONVERT + ["new_db"], ERROR,
         ("list.txt:3", "label 99999999999", "int32"),
         _write("list.txt", "a.jpg 0\nb.jpg 1\nc.jpg 99999999999\n")),
    Case("convert-label-not-integer", CONVERT + ["new_db"], ERROR, ("list.txt:1", "'x1'"),
         _write("list.txt", "a.jpg x1\n")),
    Case("convert-line-without-label", CONVERT + ["new_db"], ERROR,
         ("list.txt:2", "expected '<path> <label>'"), _write("list.txt", "a.jpg 0\nb.jpg\n")),
    Case("convert-listing-missing", ["convert-imageset", "images/", "nope.txt", "new_db"], ERROR,
         ("nope.txt", "not found")),
    Case("convert-listing-is-a-folder", ["convert-imageset", "images/", "images", "new_db"],
         ERROR, ("images", "EISDIR")),
    Case("convert-listing-empty", CONVERT + ["new_db"], ERROR, ("list.txt", "no lines"),
         _write("list.txt", "")),
    Case("convert-no-image-exists", CONVERT + ["new_db"], ERROR,
         ("none of the 2 images", "missing1.jpg", "ROOTFOLDER"),
         _write("list.txt", "missing1.jpg 0\nmissing2.jpg 1\n")),
    Case("convert-root-missing", ["convert-imageset", "nowhere/", "list.txt", "new_db"], ERROR,
         ("nowhere/", "root folder")),
    Case("convert-encode-type-bogus", ["convert-imageset", "--encode_type=bogus"]
         + CONVERT[1:] + ["new_db"], ERROR, ("--encode_type='bogus'", "jpg")),
    Case("convert-huge-resize", ["convert-imageset", "--resize_height=100000",
                                 "--resize_width=100000"] + CONVERT[1:] + ["new_db"], ERROR,
         ("--resize_height=100000", "limit", "choose smaller sizes")),
    Case("convert-one-resize-size", ["convert-imageset", "--resize_height=32"] + CONVERT[1:]
         + ["new_db"], ERROR, ("--resize_width=0", "give both sizes")),
    Case("convert-negative-resize", ["convert-imageset", "--resize_width=-1"] + CONVERT[1:]
         + ["new_db"], USAGE, ("--resize_width", "must be >= 0, got -1")),
    Case("convert-zero-workers", ["convert-imageset", "--workers=0"] + CONVERT[1:] + ["new_db"],
         USAGE, ("--workers", ">= 1")),
    Case("convert-leveldb", ["convert-imageset", "--backend=leveldb"] + CONVERT[1:] + ["new_db"],
         ERROR, ("leveldb", "--backend=lmdb")),
    Case("convert-db-exists", CONVERT + ["db"], ERROR, ("db already exists", "--overwrite")),
    Case("convert-overwrite-user-folder", ["convert-imageset", "--overwrite"] + CONVERT[1:]
         + ["photos"], ERROR, ("photos holds 'holiday.jpg'", "only an LMDB"),
         _write("photos/holiday.jpg", b"precious")),
    Case("convert-overwrite-a-file", ["convert-imageset", "--overwrite"] + CONVERT[1:]
         + ["notes.txt"], ERROR, ("notes.txt is a file",), _write("notes.txt", "precious")),
    Case("convert-parent-missing", CONVERT + ["no/such/db"], ERROR,
         ("no/such/db", "does not exist")),
    Case("convert-too-many-skipped", ["convert-imageset", "--max_skipped=0"] + CONVERT[1:]
         + ["new_db"], ERROR, ("--max-skipped=0", "missing.jpg", "no DB written"),
         _write("list.txt", "a.jpg 0\nmissing.jpg 1\n")),
    Case("convert-check-size", ["convert-imageset", "--check_size"] + CONVERT[1:] + ["new_db"],
         ERROR, ("--check_size", "d.jpg", "list.txt:2"),
         _both(_write("list.txt", "a.jpg 0\nd.jpg 1\n"),
               lambda ws: cv2.imwrite(str(ws / "images" / "d.jpg"),
                                      np.zeros((20, 20, 3), np.uint8)))),
    Case("convert-path-too-long-for-a-key", CONVERT + ["new_db"], ERROR,
         ("list.txt:1", "longer than", "LMDB key"), _write("list.txt", "x" * 600 + ".jpg 0\n")),
    Case("convert-nul-in-db-name", CONVERT + ["new\0db"], ERROR, ("NUL byte",)),
    Case("convert-line-split-only-at-newline", ["convert-imageset", "--max_skipped=0"]
         + CONVERT[1:] + ["new_db"], ERROR, ("list.txt:2", "a\\u2028b.jpg", "cannot read"),
         _write("list.txt", "a.jpg 0\na\u2028b.jpg 1\n")),
    Case("convert-name-not-utf8", ["convert-imageset", "--max_skipped=0"] + CONVERT[1:]
         + ["new_db"], ERROR, ("caf", "list.txt:2", "could not decode", "no DB written"),
         _both(_write("list.txt", b"a.jpg 0\ncaf\xe9.jpg 1\n"),
               lambda ws: (ws / "images" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"junk"))),
    *[Case(f"convert-bomb-{name}", ["convert-imageset", "--max_skipped=0"] + CONVERT[1:]
           + ["new_db"], ERROR, ("bomb", "header says 20000x20000", "decompression bomb"),
           _both(_write("list.txt", "a.jpg 0\nbomb 1\n"),
                 _write("images/bomb", image_bombs.BOMBS[name][0](20000, 20000))))
      for name in sorted(image_bombs.BOMBS) if not name.startswith("webp-vp8")],
    # ---- compute-image-mean
    Case("mean-db-missing", MEAN + ["nope_lmdb"], ERROR, ("nope_lmdb", "does not exist")),
    Case("mean-folder-not-lmdb", MEAN + ["images"], ERROR, ("images", "not an LMDB")),
    Case("mean-junk-data-file", MEAN + ["junk"], ERROR, ("junk",),
         _write("junk/data.mdb", b"not an lmdb at all" * 600)),
    Case("mean-second-meta-page-corrupt", MEAN + ["db"], ERROR,
         ("data.mdb", "second meta page", "rebuild it"),
         lambda ws: _patch(ws / "db" / "data.mdb", 4096 + 16, b"\0" * 8)),
    Case("mean-lmdb-root-outside-the-file", MEAN + ["db"], ERROR,
         ("data.mdb: page 1", "root page 9999", "outside the pages in use", "rebuild it"),
         lambda ws: _patch_lmdb(ws, lambda at: (at["md_root"], struct.pack("<Q", 9999)))),
    Case("mean-empty-db", MEAN + ["empty"], ERROR, ("empty", "no records"),
         _lmdb("empty", [])),
    Case("mean-mixed-shapes", MEAN + ["mixed"], ERROR,
         ("00000001_img1.jpg", "[3, 9, 9]", "--resize_height"),
         _lmdb("mixed", [0, 1], [(3, 8, 8), (3, 9, 9)])),
    Case("mean-record-not-a-datum", MEAN + ["db"], ERROR,
         ("db: record '00000001_img1.jpg'", "corrupt Datum"), lambda ws: _put(ws, 1, b"\xff" * 9)),
    Case("mean-encoded-record-undecodable", MEAN + ["db"], ERROR,
         ("record '00000003_img3.jpg'", "could not decode"),
         lambda ws: _put(ws, 3, encoded_datum_bytes(b"not an image", 3))),
    # records whose own fields are wrong are named for what is wrong with them
    Case("mean-datum-data-short", MEAN + ["db"], ERROR,
         ("record '00000002_img2.jpg'", "100 bytes", "3x8x8 = 192", "cut short"),
         lambda ws: _put(ws, 2, _datum(3, 8, 8, b"\1" * 100))),
    Case("mean-datum-zero-dimensions", MEAN + ["db"], ERROR,
         ("record '00000002_img2.jpg'", "0x0x0", "no image"),
         lambda ws: _put(ws, 2, _datum(0, 0, 0, b""))),
    Case("mean-encoded-record-a-bomb", MEAN + ["db"], ERROR,
         ("record '00000003_img3.jpg'", "BMP header says 20000x20000", "decompression bomb"),
         lambda ws: _put(ws, 3, encoded_datum_bytes(image_bombs.bmp_rle8(20000, 20000), 3))),
    Case("mean-output-folder-missing", MEAN + ["db", "no/such/mean.binaryproto"], ERROR,
         ("no/such/mean.binaryproto", "ENOENT")),
    Case("mean-output-is-a-folder", MEAN + ["db", "out"], ERROR, ("out", "EISDIR")),
    Case("mean-leveldb", MEAN + ["--backend=leveldb", "db"], ERROR, ("leveldb",)),
    # ---- extract
    Case("extract-file-then-member-inside", ["extract", "clash.tar", "--to=dest"], ERROR,
         ("member 'a' is a file", "'a/b'", "nothing was written"),
         _write("clash.tar", _tar([("a", b"x"), ("a/b", b"y")]))),
    Case("extract-truncated-tar-gz", ["extract", "cut.tar.gz", "--to=dest"], ERROR,
         ("cut.tar.gz", "corrupt or truncated", "download it again"), _gz),
    Case("extract-damaged-header", ["extract", "bad.tar", "--to=dest"], ERROR,
         ("bad.tar", "damaged member header"), _corrupt_header_tar),
    Case("extract-symlink-member", ["extract", "link.tar", "--to=dest"], ERROR,
         ("symlink", "link.JPEG"), _symlink_tar),
    Case("extract-dotdot-member", ["extract", "up.tar", "--to=dest"], ERROR,
         ("'../evil.JPEG'", "'..'"), _write("up.tar", _tar([("../evil.JPEG", b"x")]))),
    Case("extract-archive-missing", ["extract", "nope.tar", "--to=dest"], ERROR,
         ("nope.tar", "no such file")),
    Case("extract-not-a-tar", ["extract", "list.txt", "--to=dest"], ERROR,
         ("list.txt", "not a tar archive")),
    Case("extract-destination-is-a-file", ["extract", "ok.tar", "--to=list.txt"], ERROR,
         ("cannot create folder", "list.txt")),
    Case("extract-kind-bogus", ["extract", "ok.tar", "--to=dest", "--kind=zip"], ERROR,
         ("'zip'", "valid")),
    # ---- download / fetch
    Case("download-source-missing", ["download", "nope.tar", "--to=downloads"], ERROR,
         ("nope.tar", "no such file")),
    Case("download-md5-mismatch", ["download", "ok.tar", "--to=downloads", "--md5=" + "0" * 32],
         ERROR, ("ok.tar", "md5")),
    Case("download-timeout-zero", ["download", "ok.tar", "--to=downloads", "--timeout=0"],
         ERROR, ("--timeout", "> 0")),
    Case("download-connection-refused", ["download", f"http://127.0.0.1:{_closed_port()}/x.tar",
                                         "--to=new/downloads", "--retries=0"], ERROR,
         ("127.0.0.1", "cannot connect", "nothing was received")),
    Case("fetch-archives-missing", ["fetch", "--train=nope_train.tar", "--val=nope_val.tar",
                                    "--data_root=root"], ERROR, ("nope_",)),
    # ---- train
    Case("train-negative-iterations", ["train", "--solver=none.prototxt", "--iterations=-5"],
         USAGE, ("--iterations", "must be >= 1, got -5")),
    Case("train-solver-missing", ["train", "--solver=none.prototxt"], ERROR,
         ("none.prototxt",)),
    Case("train-solver-malformed", TRAIN, ERROR, ("solver.prototxt", "2"),
         _write("solver.prototxt", 'net: "net.prototxt"\nbase_lr: {{\n')),
    Case("train-snapshot-and-weights", TRAIN + ["--snapshot=a.solverstate",
                                                "--weights=a.caffemodel"], ERROR, ("not both",)),
    Case("train-snapshot-missing", TRAIN + ["--snapshot=gone.solverstate"], ERROR,
         ("gone.solverstate",)),
    Case("train-label-above-classes", TRAIN, ERROR,
         ("record '00000001_img1.jpg'", "label 7", "layer 'loss'", "[0, 4)"),
         _lmdb("db", [0, 7, 1, 2, 3, 0])),
    Case("train-negative-label", TRAIN, ERROR,
         ("record '00000002_img2.jpg'", "label -1", "layer 'loss'"),
         _lmdb("db", [0, 1, -1, 2, 3, 0])),
    Case("train-record-not-a-datum", TRAIN, ERROR,
         ("db: record '00000002_img2.jpg'", "corrupt Datum"), lambda ws: _put(ws, 2, b"\xff" * 9)),
    Case("train-lmdb-page-number-wrong", TRAIN, ERROR,
         ("data.mdb: page 2", "its header says it is page 77", "rebuild it"),
         lambda ws: _patch_lmdb(ws, lambda at: (at["root"], struct.pack("<Q", 77)))),
    Case("train-solver-is-a-folder", ["train", "--solver=images"], ERROR, ("images",)),
    Case("train-nul-in-a-data-source", TRAIN, ERROR,
         ("net.prototxt", "data_param.source (in layer 'data')", "NUL byte"),
         lambda ws: (ws / "net.prototxt").write_text(NET.replace('"db"', '"d\\000b"'))),
    Case("train-nul-in-snapshot-prefix", TRAIN, ERROR,
         ("solver.prototxt", "snapshot_prefix", "NUL byte"),
         lambda ws: (ws / "solver.prototxt").write_text(SOLVER.replace('"snap"', '"sn\\000ap"'))),
    Case("train-precision-bogus", TRAIN + ["--precision=fp8"], ERROR, ("fp8", "fp32")),
    Case("train-encoded-record-a-bomb", TRAIN, ERROR,
         ("record '00000002_img2.jpg'", "GIF header says 20000x20000", "decompression bomb"),
         lambda ws: _put(ws, 2, encoded_datum_bytes(image_bombs.gif(20000, 20000), 2))),
    Case("train-snapshot-prefix-under-a-file", TRAIN, ERROR,
         ("snapshot_prefix 'list.txt/snap'", "list.txt is a file"),
         _write("solver.prototxt", SOLVER.replace('"snap"', '"list.txt/snap"'))),
    # solver values Caffe trains on without a word
    *[Case(f"train-solver-{name}", TRAIN, ERROR, ("solver.prototxt", *names),
           _write("solver.prototxt", "".join(
               line + "\n" for line in SOLVER.splitlines()
               if line.split(":")[0] not in extra) + extra)) for name, extra, names in (
        ("negative-base-lr", "base_lr: -0.01\n", ("base_lr", "-0.01")),
        ("negative-weight-decay", "weight_decay: -0.0005\n", ("weight_decay", "-0.0005")),
        ("momentum-one", "momentum: 1\n", ("momentum must be below 1",)),
        ("nan-base-lr", "base_lr: nan\n", ("base_lr", "nan")),
        ("step-without-stepsize", 'lr_policy: "step"\n', ("stepsize > 0",)),
        ("negative-max-iter", "max_iter: -2\n", ("max_iter", "-2")),
    )],
    # ---- test
    Case("test-zero-iterations", ["test", "--model=net.prototxt", "--weights=w.caffemodel",
                                  "--iterations=0"], USAGE, ("--iterations", ">= 1")),
    Case("test-weights-missing", ["test", "--model=net.prototxt", "--weights=gone.caffemodel"],
         ERROR, ("gone.caffemodel",)),
    Case("test-label-above-classes", ["test", "--model=net.prototxt", "--weights=w.caffemodel",
                                      "--iterations=1"], ERROR,
         ("db: record '00000001_img1.jpg'", "label 9", "[0, 4)"), _lmdb("db", [0, 9, 1, 2, 3, 0])),
    Case("test-lmdb-record-count-wrong", ["test", "--model=net.prototxt",
                                          "--weights=w.caffemodel", "--iterations=1"], ERROR,
         ("data.mdb", "hold 6 records but the meta page says 99", "rebuild it"),
         lambda ws: _patch_lmdb(ws, lambda at: (at["md_entries"], struct.pack("<Q", 99)))),
    Case("test-no-model", ["test", "--weights=w.caffemodel"], ERROR, ("--model",)),
    Case("test-datum-data-short", ["test", "--model=net.prototxt", "--weights=w.caffemodel",
                                   "--iterations=2"], ERROR,
         ("record '00000002_img2.jpg'", "100 bytes", "192", "cut short"),
         lambda ws: _put(ws, 2, _datum(3, 8, 8, b"\1" * 100))),
    Case("test-datum-zero-dimensions", ["test", "--model=net.prototxt", "--weights=w.caffemodel",
                                        "--iterations=2"], ERROR,
         ("record '00000002_img2.jpg'", "3x0x8", "no image"),
         lambda ws: _put(ws, 2, _datum(3, 0, 8, b""))),
    Case("test-mean-file-of-other-channels", ["test", "--model=net_m.prototxt",
                                              "--weights=w.caffemodel", "--iterations=1"], ERROR,
         ("mean1.binaryproto", "(1, 8, 8)", "(3, 8, 8)"),
         _both(_write("net_m.prototxt", NET.replace(
             "crop_size: 6 }", 'crop_size: 6 mean_file: "mean1.binaryproto" }')),
             lambda ws: _mean(ws / "mean1.binaryproto", 1))),
    Case("classify-single-non-image", ["classify", "--model=deploy.prototxt",
                                       "--weights=w.caffemodel", "notes.jpg"], ERROR,
         ("none of the 1 images could be classified", "notes.jpg", "could not decode"),
         _both(_write("notes.jpg", "not an image"), _write("deploy.prototxt", DEPLOY))),
    Case("classify-mean-of-other-channels", ["classify", "--model=deploy.prototxt",
                                             "--weights=w.caffemodel", "--mean=mean1.binaryproto",
                                             "images/a.jpg"], ERROR,
         ("mean1.binaryproto", "1 channels", "input 3"),
         _both(lambda ws: _mean(ws / "mean1.binaryproto", 1), _write("deploy.prototxt", DEPLOY))),
    # weights that would leave layers at their random initialisation, in every reader
    Case("test-weights-empty-file", ["test", "--model=net.prototxt", "--weights=zero.caffemodel",
                                     "--iterations=1"], ERROR,
         ("zero.caffemodel", "empty weights file"), _write("zero.caffemodel", b"")),
    Case("test-weights-cut-at-a-layer-boundary", ["test", "--model=net.prototxt",
                                                  "--weights=cut.caffemodel", "--iterations=1"],
         ERROR, ("cut.caffemodel", "no weights for layer(s) 'fc'", "random initialisation",
                 "cut short"), _cut_weights("cut.caffemodel", 1)),
    Case("test-weights-cut-after-the-name", ["test", "--model=net.prototxt",
                                             "--weights=cut.caffemodel", "--iterations=1"],
         ERROR, ("cut.caffemodel", "holds no layers"), _cut_weights("cut.caffemodel", 0)),
    Case("train-weights-empty-file", TRAIN + ["--weights=zero.caffemodel"], ERROR,
         ("zero.caffemodel", "empty weights file"), _write("zero.caffemodel", b"")),
    Case("train-weights-cut-at-a-layer-boundary", TRAIN + ["--weights=cut.caffemodel"], ERROR,
         ("cut.caffemodel", "none of the 1 learnable layers", "'fc'"),
         _cut_weights("cut.caffemodel", 1)),
    Case("train-snapshot-solverstate-empty", TRAIN + ["--snapshot=s_iter_1.solverstate"],
         ERROR, ("s_iter_1.solverstate", "empty solverstate"), _snapshot(b"")),
    Case("train-snapshot-solverstate-cut-before-current-step",
         TRAIN + ["--snapshot=s_iter_1.solverstate"], ERROR,
         ("s_iter_1.solverstate", "no current_step", "cut short"),
         lambda ws: _snapshot(_solverstate_without("current_step"))(ws)),
    Case("train-snapshot-solverstate-cut-in-the-history",
         TRAIN + ["--snapshot=s_iter_1.solverstate"], ERROR,
         ("s_iter_1.solverstate", "history blobs", "has 1", "needs 2", "cut short"),
         lambda ws: _snapshot(_solverstate_without("history"))(ws)),
    Case("train-snapshot-caffemodel-empty", TRAIN + ["--snapshot=s_iter_1.solverstate"], ERROR,
         ("zero.caffemodel", "empty weights file"),
         _both(_write("zero.caffemodel", b""), _snapshot(caffemodel="zero.caffemodel"))),
    Case("train-snapshot-caffemodel-cut", TRAIN + ["--snapshot=s_iter_1.solverstate"], ERROR,
         ("cut.caffemodel", "no weights for layer(s) 'fc'", "cut short"),
         _both(_cut_weights("cut.caffemodel", 1), _snapshot(caffemodel="cut.caffemodel"))),
    Case("classify-weights-empty-file", ["classify", "--model=deploy.prototxt",
                                         "--weights=zero.caffemodel", "images/a.jpg"], ERROR,
         ("zero.caffemodel", "empty weights file"),
         _both(_write("zero.caffemodel", b""), _write("deploy.prototxt", DEPLOY))),
    Case("classify-weights-cut-at-a-layer-boundary",
         ["classify", "--model=deploy.prototxt", "--weights=cut.caffemodel", "images/a.jpg"],
         ERROR, ("cut.caffemodel", "no weights for layer(s) 'fc'"),
         _both(_cut_weights("cut.caffemodel", 1), _write("deploy.prototxt", DEPLOY))),
    # ---- time
    Case("time-zero-iterations", ["time", "--model=net.prototxt", "--iterations=0"], USAGE,
         ("--iterations", ">= 1")),
    Case("time-phase-bogus", ["time", "--model=net.prototxt", "--phase=VALIDATE"], ERROR,
         ("VALIDATE",)),
    Case("time-model-missing", ["time", "--model=gone.prototxt"], ERROR, ("gone.prototxt",)),
    # ---- pipeline
    Case("pipeline-params-malformed-json", ["pipeline", "--params", "p.json"], ERROR,
         ("p.json:1:2", "not valid JSON"), _write("p.json", "{bad")),
    Case("pipeline-params-not-an-object", ["pipeline", "--params", "p.json"], ERROR,
         ("p.json", "JSON list"), _write("p.json", "[1, 2]")),
    Case("pipeline-params-unknown-key", ["pipeline", "--params", "p.json"], ERROR,
         ("unknown parameter 'max_iters'", "max_iter"), _write("p.json", '{"max_iters": 3}')),
    Case("pipeline-params-missing", ["pipeline", "--params", "gone.json"], ERROR,
         ("gone.json", "ENOENT")),
    Case("pipeline-nul-in-data-root", ["pipeline", "--params", "p.json"], ERROR,
         ("data_root", "NUL byte"), _write("p.json", '{"data_root": "a\\u0000b"}')),
    Case("pipeline-bad-value", ["pipeline", "--max_iter=abc"], ERROR,
         ("max_iter", "integer", "'abc'")),
    # one typed check of every parameter (JSON's true is no number, "5" no count)
    Case("pipeline-params-sources-a-number", ["pipeline", "--params", "p.json"], ERROR,
         ('sources', 'valid dictionary', 'got 3'), _write("p.json", '{"sources": 3}')),
    Case("pipeline-params-sources-a-word", ["pipeline", "--params", "p.json"], ERROR,
         ('sources', 'valid dictionary', "'nonsense'"), _write("p.json", '{"sources": "nonsense"}')),
    Case("pipeline-params-sources-train-a-number", ["pipeline", "--params", "p.json"], ERROR,
         ('sources.train', 'valid string'), _write("p.json", '{"sources": {"train": 5}}')),
    Case("pipeline-params-sources-train-empty", ["pipeline", "--params", "p.json"], ERROR,
         ('sources.train', 'at least 1 character'), _write("p.json", '{"sources": {"train": ""}}')),
    Case("pipeline-params-workers-a-bool", ["pipeline", "--params", "p.json"], ERROR,
         ('workers', 'valid integer', 'True'), _write("p.json", '{"workers": true}')),
    Case("pipeline-params-workers-a-million", ["pipeline", "--params", "p.json"], ERROR,
         ('workers', 'less than or equal to 256'), _write("p.json", '{"workers": 1000000}')),
    Case("pipeline-params-processes-beyond-the-cores", ["pipeline", "--params", "p.json"], ERROR,
         ('processes', '1000 training processes', 'cores'), _write("p.json", '{"processes": 1000}')),
    Case("pipeline-params-processes-zero", ["pipeline", "--params", "p.json"], ERROR,
         ('processes', 'greater than or equal to 1'), _write("p.json", '{"processes": 0}')),
    Case("pipeline-params-max-iter-a-string", ["pipeline", "--params", "p.json"], ERROR,
         ('max_iter', 'valid integer', "'5'"), _write("p.json", '{"max_iter": "5"}')),
    Case("pipeline-params-max-iter-a-float", ["pipeline", "--params", "p.json"], ERROR,
         ('max_iter', 'valid integer'), _write("p.json", '{"max_iter": 5.5}')),
    Case("pipeline-params-max-iter-beyond-int32", ["pipeline", "--params", "p.json"], ERROR,
         ('max_iter', '2147483647'), _write("p.json", '{"max_iter": 99999999999}')),
    Case("pipeline-params-snapshot-interval-negative", ["pipeline", "--params", "p.json"], ERROR,
         ('snapshot_interval', 'greater than 0'), _write("p.json", '{"snapshot_interval": -1}')),
    Case("pipeline-params-encoded-a-string", ["pipeline", "--params", "p.json"], ERROR,
         ('encoded', 'valid boolean'), _write("p.json", '{"encoded": "yes"}')),
    Case("pipeline-params-shuffle-seed-a-bool", ["pipeline", "--params", "p.json"], ERROR,
         ('shuffle_seed', 'valid integer'), _write("p.json", '{"shuffle_seed": false}')),
    Case("pipeline-params-stages-a-string", ["pipeline", "--params", "p.json"], ERROR,
         ('stages', 'valid list'), _write("p.json", '{"stages": "convert"}')),
    Case("pipeline-params-stages-unknown", ["pipeline", "--params", "p.json"], ERROR,
         ('stages[1]', "'bake'"), _write("p.json", '{"stages": ["convert", "bake"]}')),
    Case("pipeline-params-force-a-number", ["pipeline", "--params", "p.json"], ERROR,
         ('force', 'valid list'), _write("p.json", '{"force": 1}')),
    Case("pipeline-params-devices-a-bool", ["pipeline", "--params", "p.json"], ERROR,
         ('devices[0]', 'valid integer'), _write("p.json", '{"devices": [true]}')),
    Case("pipeline-params-devices-negative", ["pipeline", "--params", "p.json"], ERROR,
         ('devices[0]', 'greater than or equal to 0'), _write("p.json", '{"devices": [-1]}')),
    Case("pipeline-params-devices-twice", ["pipeline", "--params", "p.json"], ERROR,
         ('devices', 'named twice'), _write("p.json", '{"devices": [0, 0]}')),
    Case("pipeline-params-resize-one-size", ["pipeline", "--params", "p.json"], ERROR,
         ('resize_height=0', 'resize_width=64', 'give both'),
         _write("p.json", '{"resize_height": 0, "resize_width": 64}')),
    Case("pipeline-params-resize-a-bomb", ["pipeline", "--params", "p.json"], ERROR,
         ('10,000,000,000 pixels', 'limit'), _write("p.json", '{"resize_height": 100000, "resize_width": 100000}')),
    Case("pipeline-params-data-root-empty", ["pipeline", "--params", "p.json"], ERROR,
         ('data_root', 'at least 1 character'), _write("p.json", '{"data_root": ""}')),
    Case("pipeline-params-data-root-a-list", ["pipeline", "--params", "p.json"], ERROR,
         ('data_root', 'valid string'), _write("p.json", '{"data_root": ["a"]}')),
    Case("pipeline-params-solver-null", ["pipeline", "--params", "p.json"], ERROR,
         ('solver', 'valid string'), _write("p.json", '{"solver": null}')),
    Case("pipeline-params-finetune-lr-factor-infinite", ["pipeline", "--params", "p.json"],
         ERROR, ("finetune_lr_factor", "finite number"),
         _write("p.json", '{"finetune_lr_factor": Infinity}')),
    Case("pipeline-params-weights-empty", ["pipeline", "--params", "p.json"], ERROR,
         ("weights", "at least 1 character"), _write("p.json", '{"weights": ""}')),
    Case("pipeline-flag-workers-true", ["pipeline", "--workers=true"], ERROR,
         ("--workers='true'", "valid integer")),
    Case("pipeline-flag-devices-not-numbers", ["pipeline", "--devices=0,gpu"], ERROR,
         ("--devices='0,gpu'", "devices[1]", "valid integer")),
    # ---- the command line itself
    Case("unknown-command", ["trian"], USAGE, ("'trian'", "train")),
    Case("unknown-flag", ["train", "--solverr=x"], USAGE, ("--solverr",)),
]


def _put(ws: Path, index: int, value: bytes) -> None:
    """Replace record `index` of the workspace's LMDB (its key kept) by `value`."""
    import lmdb

    with lmdb.open(str(ws / "db"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.put(f"{index:08d}_img{index}.jpg".encode(), value)


def _datum(channels: int, height: int, width: int, data: bytes) -> bytes:
    from data.proto import caffe_pb2

    return caffe_pb2.Datum(channels=channels, height=height, width=width, data=data,
                           label=1).SerializeToString()


def _mean(path: Path, channels: int) -> None:
    from data.datum import write_blobproto

    write_blobproto(path, np.zeros((channels, 8, 8), np.float32))


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _lmdb_places(data: Path) -> dict[str, int]:
    """Byte offsets in a data.mdb to aim corruptions at (LMDB 0.9's layout, described in
    data/lmdb_verify.py): the current meta page's md_entries and md_root, the root page, the
    root's second child pointer (when the root is a branch), the leftmost leaf's first node."""
    raw, ps = data.read_bytes(), 4096
    meta = ps if struct.unpack_from("<Q", raw, ps + 144) > struct.unpack_from("<Q", raw, 144) \
        else 0
    (root,) = struct.unpack_from("<Q", raw, meta + 128)
    node_at = lambda page, i: page * ps + struct.unpack_from("<H", raw, page * ps + 16 + 2 * i)[0]
    at = {"md_entries": meta + 120, "md_root": meta + 128, "root": root * ps}
    page = root
    while raw[page * ps + 10] & 1:  # P_BRANCH: go down the leftmost child
        at.setdefault("child", node_at(page, 1))
        lo, hi = struct.unpack_from("<HH", raw, node_at(page, 0))
        page = lo | hi << 16
    at["leaf_node"] = node_at(page, 0)
    return at


def _patch_lmdb(ws: Path, where: Callable[[dict[str, int]], tuple[int, bytes]]) -> None:
    data = ws / "db" / "data.mdb"
    _patch(data, *where(_lmdb_places(data)))


def _command(argv: list[str]) -> str:
    return argv[0] if argv and argv[0] in COMMANDS else ""


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error:" in line]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_ends_in_one_line_and_changes_nothing(case, template, tmp_path, monkeypatch,
                                                        capsys):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    if case.setup is not None:
        case.setup(ws)
    before = state(ws)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("IMAGENET_DEBUG", raising=False)
    monkeypatch.setenv("IMAGENET_TRACEBACK_DIR", str(tmp_path / "tracebacks"))
    try:
        code = main(list(case.argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    errors = _error_lines(err)
    assert len(errors) == 1, err
    line = errors[0]
    who = _command(case.argv)
    assert line.startswith(f"imagenet {who}: error: " if who else "imagenet: error: "), line
    assert err.rstrip().endswith(line), "the error line is the last thing printed"
    for name in case.names:
        assert name in line, f"{name!r} not in {line!r}"
    assert state(ws) == before, "the command changed the workspace"
    assert not (tmp_path / "tracebacks").exists(), "an expected error was reported as a bug"


def test_corpus_size() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert {"convert-imageset", "compute-image-mean", "extract", "download", "fetch", "train",
            "test", "time", "pipeline"} <= commands


def test_unexpected_exception_is_one_line_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    """A bug (not an ImagenetError or OSError) prints one line naming the file that holds its
    traceback, exits 70; IMAGENET_DEBUG=1 lets the exception through instead."""
    import flows.commands.compute_image_mean as command

    def bug(args):
        raise ValueError("something the code did not expect")

    monkeypatch.setattr(command, "run", bug)
    monkeypatch.setenv("IMAGENET_TRACEBACK_DIR", str(tmp_path))
    monkeypatch.delenv("IMAGENET_DEBUG", raising=False)
    assert main(["compute-image-mean", "db"]) == EXIT_BUG
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    written = list(tmp_path.glob("imagenet-compute-image-mean-*.traceback"))
    assert len(written) == 1 and str(written[0]) in err
    assert "unexpected ValueError: something the code did not expect" in err
    text = written[0].read_text()
    assert "Traceback (most recent call last)" in text and "in bug" in text
    monkeypatch.setenv("IMAGENET_DEBUG", "1")
    with pytest.raises(ValueError, match="did not expect"):
        main(["compute-image-mean", "db"])


def test_device_out_of_memory_is_an_error_with_what_to_do(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED (a batch too large for the device) is the user's to fix."""
    import flows.commands.time as command

    class XlaRuntimeError(RuntimeError):  # jaxlib's type, recognised by name
        pass

    def oom(args):
        raise XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 99999999999 bytes.")

    monkeypatch.setattr(command, "run", oom)
    assert main(["time", "--model=net.prototxt"]) == ERROR
    err = capsys.readouterr().err
    assert err.startswith("imagenet time: error: out of device memory (RESOURCE_EXHAUSTED")
    assert "smaller batch_size" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- subprocess cases

def _imagenet(args: list[str], cwd: Path, *, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGENET_ALLOCATOR": "system"}
    env.pop("IMAGENET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line(proc: subprocess.CompletedProcess, command: str, *names: str) -> None:
    assert 0 < proc.returncode < 128, (proc.returncode, proc.stderr[-2000:])  # no signal death
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"imagenet {command}: error: "), proc.stderr
    for name in names:
        assert name in errors[0], errors[0]


@pytest.mark.parametrize("command", ["compute-image-mean", "train"])
def test_truncated_lmdb_is_an_error_not_sigbus(command, template, tmp_path):
    """data.mdb cut short used to kill compute-image-mean and train with SIGBUS (exit 135)."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    shutil.rmtree(ws / "db")
    _db(ws / "db", [i % CLASSES for i in range(40)], [(3, 40, 40)] * 40)  # overflow pages
    os.truncate(ws / "db" / "data.mdb", 3 * 4096)
    before = state(ws)
    args = ["compute-image-mean", "db", "m.binaryproto"] if command != "train" else TRAIN
    _assert_one_line(_imagenet(args, ws), command, "data.mdb", "truncated", "rebuild it")
    assert state(ws) == before


# A branch pointing back up the tree aborted LMDB (SIGABRT, mdb.c: Assertion 'IS_LEAF(mp)');
# a leaf node's value size garbled read past the file's end (SIGBUS).
LMDB_CORRUPTIONS = {
    "branch-points-up": (lambda at: (at["child"], struct.pack("<HH", at["root"] // 4096, 0)),
                         ("data.mdb: page", "reaches this page twice", "rebuild it")),
    "value-size-garbled": (lambda at: (at["leaf_node"] + 2, struct.pack("<H", 0xFFFF)),
                           ("data.mdb: page", "leaf node 0 points to overflow pages",
                            "rebuild it")),
}


@pytest.mark.parametrize("command,corruption", [("train", "branch-points-up"),
                                                ("compute-image-mean", "value-size-garbled")])
def test_corrupt_lmdb_is_an_error_not_a_signal(command, corruption, template, tmp_path):
    """Page numbers and sizes garbled inside data.mdb used to kill the process inside LMDB."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    shutil.rmtree(ws / "db")
    _db(ws / "db", [i % CLASSES for i in range(120)], [(3, 40, 40)] * 120)  # a branch root
    where, names = LMDB_CORRUPTIONS[corruption]
    _patch_lmdb(ws, where)
    before = state(ws)
    args = ["compute-image-mean", "db", "m.binaryproto"] if command != "train" else TRAIN
    _assert_one_line(_imagenet(args, ws), command, *names)
    assert state(ws) == before


def test_refused_pipeline_creates_no_data_root(tmp_path):
    """`imagenet pipeline` keeps Prefect's home in the data root; a command refused for its
    parameters must not leave that folder behind (PREFECT_HOME unset, as for a user)."""
    (tmp_path / "p.json").write_text("{bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_HOME")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--params", "p.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, "pipeline", "p.json:1:2", "not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def _private_mount(tmp_path: Path) -> list[str]:
    """A prefix that runs a command in its own mount namespace (so it may mount a tmpfs
    without touching the machine), or a skip when this machine allows none."""
    probe = ["unshare", "-rm", "true"] if os.geteuid() != 0 else ["unshare", "-m", "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("SKIPPING read-only/full-disk cases: no private mount namespace here "
                    "(unshare -m is not permitted)")
    return probe[:-1]


DISK_CASES = {
    # (mount options, command, args, culprit)
    "convert-onto-read-only": ("ro", "convert-imageset",
                               ["images/", "list.txt", "MNT/db"], ("MNT/db", "EROFS")),
    "mean-onto-read-only": ("ro", "compute-image-mean", ["db", "MNT/mean.binaryproto"],
                            ("MNT/mean.binaryproto", "EROFS")),
    "extract-onto-read-only": ("ro", "extract", ["ok.tar", "--to=MNT/x"], ("MNT/x", "EROFS")),
    "convert-onto-full-disk": ("size=64k", "convert-imageset",
                               ["--resize_height=64", "--resize_width=64", "images/", "many.txt",
                                "MNT/db"], ("MNT/db", "free space")),
}


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_read_only_and_full_disks_are_one_line(case, template, tmp_path):
    """EROFS and a full disk (LMDB's commit reports the short write as EIO) used to be
    tracebacks; a failed conversion leaves nothing on the disk."""
    prefix = _private_mount(tmp_path)
    options, command, args, names = DISK_CASES[case]
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    (ws / "many.txt").write_text("".join(f"{n} {i % 3}\n" for i in range(40)
                                         for n in ("a.jpg", "b.jpg", "c.jpg")))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [a.replace("MNT", str(mnt)) for a in args]
    script = (f"mount -t tmpfs -o {options} tmpfs {mnt} && "
              f"{sys.executable} -m flows.cli {command} "
              + " ".join(f"'{a}'" for a in args)
              + f"; status=$?; ls -A {mnt} >&2; exit $status")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(prefix + ["sh", "-c", script], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=120)
    _assert_one_line(proc, command, *[n.replace("MNT", str(mnt)) for n in names])
    # `ls -A` of the disk printed after the error line: nothing was left there.
    assert proc.stderr.rstrip().endswith(_error_lines(proc.stderr)[0])


def test_unwritable_snapshot_folder_fails_before_training(template, tmp_path):
    """A snapshot_prefix on a read-only disk used to fail at the first snapshot, after the
    training before it; now before the first iteration, in one line."""
    prefix = _private_mount(tmp_path)
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (ws / "solver.prototxt").write_text(SOLVER.replace('"snap"', f'"{mnt}/run/snap"'))
    script = (f"mount -t tmpfs -o ro tmpfs {mnt} && {sys.executable} -m flows.cli train "
              "--solver=solver.prototxt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGENET_ALLOCATOR": "system"}
    proc = subprocess.run(prefix + ["sh", "-c", script], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=300)
    _assert_one_line(proc, "train", f"snapshot_prefix '{mnt}/run/snap'", "EROFS")
    assert "Iteration" not in proc.stdout + proc.stderr, "it trained before failing"


WRITER = """
import sys, lmdb
sys.path.insert(0, {repo!r})
from data.proto import caffe_pb2
value = caffe_pb2.Datum(channels=3, height=40, width=40, data=bytes(4800)).SerializeToString()
env = lmdb.open({db!r}, map_size=1 << 34)
i = 1000
print("writing", flush=True)
while True:
    with env.begin(write=True) as txn:
        for _ in range(50):
            txn.put(b"%08d_more.jpg" % i, value)
            i += 1
"""


def test_a_database_being_written_is_not_called_corrupt(template, tmp_path):
    """compute-image-mean on an LMDB another process appends to said the database was corrupt
    and should be rebuilt (its readers did not register in lock.mdb, and the tree walk raced
    the writer's commits). Now each read sees the snapshot its transaction began at, and a
    change under a read is reported as a writer at work."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    shutil.rmtree(ws / "db")
    _db(ws / "db", [i % CLASSES for i in range(3000)], [(3, 40, 40)] * 3000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO),
                                                                   db=str(ws / "db"))],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        for attempt in range(4):
            proc = _imagenet(["compute-image-mean", "db", f"m{attempt}.binaryproto"], ws)
            text = proc.stdout + proc.stderr
            assert "corrupt" not in text and "rebuild" not in text, text
            assert proc.returncode == 0 or "another process is writing it" in text, text
    finally:
        writer.kill()
        writer.wait()


def test_pipeline_without_a_reachable_prefect_api_is_one_line_and_creates_nothing(tmp_path):
    """PREFECT_API_URL at a port where nothing listens: exit 70 'a bug' after the retries,
    leaving <data root>/.prefect. Now one line, and the (existing) data root untouched."""
    (tmp_path / "root").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_HOME")}
    env.update(PYTHONPATH=str(REPO), PREFECT_API_URL=f"http://127.0.0.1:{_closed_port()}/api")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--data_root=root"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, "pipeline", "PREFECT_API_URL", "no Prefect API answers",
                     "Connection refused", "nothing was run or created")
    assert list((tmp_path / "root").iterdir()) == []


@pytest.mark.parametrize("damage", ["random bytes", "cut short"])
def test_pipeline_with_a_damaged_prefect_database_is_one_line(damage, tmp_path):
    """<data root>/.prefect/prefect.db that SQLite cannot open (random bytes, or a database cut
    inside its header): the temporary server retried its start for ~3 minutes, printing
    thousands of traceback lines, then exit 70. Now one line naming the file, before the
    server starts, and the file is left as it was."""
    home = tmp_path / "root" / ".prefect"
    home.mkdir(parents=True)
    db = home / "prefect.db"
    if damage == "random bytes":
        db.write_bytes(np.random.default_rng(0).bytes(8192))
    else:
        import sqlite3
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("create table t (x)")
            conn.commit()
        db.write_bytes(db.read_bytes()[:50])
    before = db.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--data_root=root",
                           "--train=mini:tiny", "--val=mini:tiny", "--aux=mini:tiny"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, "pipeline", str(db), "Prefect's database is damaged",
                     "move it away", "nothing was run")
    assert db.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [".prefect"]


def test_pipeline_on_a_read_only_data_root_is_one_line(tmp_path):
    """A data root (with its Prefect database) on a read-only disk printed Prefect's
    tracebacks for minutes, then exited 70. Now one line before anything starts."""
    prefix = _private_mount(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(REPO)
    script = (f"mount -t tmpfs tmpfs {mnt} && mkdir -p {mnt}/root/.prefect && "
              f"touch {mnt}/root/.prefect/prefect.db && mount -o remount,ro {mnt} && "
              f"{sys.executable} -m flows.cli pipeline --data_root={mnt}/root")
    proc = subprocess.run(prefix + ["sh", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, "pipeline", "data_root", f"{mnt}/root", "EROFS")
