"""tasks.cache: stage keys change exactly when inputs, parameters or code change; manifests
tell a stage's outputs from missing, stale or foreign ones."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lmdb
import pytest

from data.errors import ImagenetError
from tasks import cache


def _write_lmdb(path: Path, records: dict[bytes, bytes], map_size: int = 1 << 20) -> None:
    env = lmdb.open(str(path), map_size=map_size)
    with env.begin(write=True) as txn:
        for k, v in records.items():
            txn.put(k, v)
    env.close()


def test_small_file_fingerprint_is_its_content(tmp_path):
    f = tmp_path / "solver.prototxt"
    f.write_text("base_lr: 0.01\n")
    key = cache.stage_key("train", inputs={"solver": f})
    os.utime(f, ns=(1, 1))  # touched, same bytes: same key
    assert cache.stage_key("train", inputs={"solver": f}) == key
    f.write_text("base_lr: 0.02\n")
    assert cache.stage_key("train", inputs={"solver": f}) != key


def test_large_file_fingerprint_is_stat_not_content(tmp_path, monkeypatch):
    """Size and mtime, not the inode or the path: a copy (cp -a) keeps the key."""
    monkeypatch.setattr(cache, "CONTENT_HASH_MAX_BYTES", 4)
    f = tmp_path / "ILSVRC2012_img_val.tar"
    f.write_bytes(b"0123456789")
    fp = cache.input_fingerprint(f)
    st = f.stat()
    assert fp == f"stat:{st.st_size}:{st.st_mtime_ns}"
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy2(f, tmp_path / "elsewhere" / f.name)
    assert cache.input_fingerprint(copy) == fp
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.input_fingerprint(f) != fp


def test_key_covers_params_stage_and_code(tmp_path):
    base = cache.stage_key("convert_train", code=["tasks.cache"], params={"resize_height": 64})
    assert cache.stage_key("convert_train", code=["tasks.cache"], params={"resize_height": 64}) == base
    assert cache.stage_key("convert_train", code=["tasks.cache"], params={"resize_height": 32}) != base
    assert cache.stage_key("convert_val", code=["tasks.cache"], params={"resize_height": 64}) != base
    assert cache.stage_key("convert_train", code=["tasks.stage"], params={"resize_height": 64}) != base
    assert base.startswith("convert_train-")


def test_code_digest_of_a_package_follows_its_files(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg_for_cache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = cache.code_digest(["fakepkg_for_cache"])
    (pkg / "a.py").write_text("X = 2\n")
    assert cache.code_digest(["fakepkg_for_cache"]) != first
    with pytest.raises(ImagenetError, match="no_such_module_here"):
        cache.code_digest(["no_such_module_here"])


def test_manifest_records_key_digest_and_detects_changes(tmp_path):
    out = tmp_path / "imagenet_mean.binaryproto"
    out.write_bytes(b"mean")
    assert not cache.outputs_valid([out], "k1")  # no manifest yet: not produced by us
    cache.write_manifest(out, stage="mean", key="k1", digest="d1", record={"count": 3})
    assert cache.outputs_valid([out], "k1")
    assert not cache.outputs_valid([out], "k2")  # produced by other parameters
    assert cache.read_manifest(out)["record"] == {"count": 3}
    assert cache.input_fingerprint(out) == "digest:d1"
    out.write_bytes(b"changed by hand")
    assert not cache.outputs_valid([out], "k1")
    out.unlink()
    assert not cache.outputs_valid([out], "k1")
    with pytest.raises(ImagenetError, match="does not exist"):
        cache.write_manifest(out, stage="mean", key="k1", digest="d1")


def test_rebuilt_identical_lmdb_keeps_downstream_key(tmp_path):
    """A rebuilt LMDB's data.mdb differs, but its recorded content digest does not."""
    from data.lmdb_io import lmdb_content_digest

    records = {b"00000000_a.JPEG": b"x" * 100, b"00000001_b.JPEG": b"y" * 50}
    db = tmp_path / "ilsvrc12_train_lmdb"
    _write_lmdb(db, records)
    cache.write_manifest(db, stage="convert_train", key="k", digest=lmdb_content_digest(db))
    downstream = cache.stage_key("mean", inputs={"lmdb": db})

    shutil.rmtree(db)
    _write_lmdb(db, records, map_size=1 << 21)  # different map size: different bytes
    cache.write_manifest(db, stage="convert_train", key="k", digest=lmdb_content_digest(db))
    assert cache.stage_key("mean", inputs={"lmdb": db}) == downstream

    shutil.rmtree(db)
    _write_lmdb(db, {**records, b"00000002_c.JPEG": b"z"})
    cache.write_manifest(db, stage="convert_train", key="k", digest=lmdb_content_digest(db))
    assert cache.stage_key("mean", inputs={"lmdb": db}) != downstream


def test_folder_input_without_manifest_is_an_error(tmp_path):
    tree = tmp_path / "train"
    tree.mkdir()
    with pytest.raises(ImagenetError, match="no valid manifest"):
        cache.stage_key("listings", inputs={"train": tree})
    with pytest.raises(ImagenetError, match="does not exist"):
        cache.stage_key("listings", inputs={"val": tmp_path / "val"})


def test_lmdb_manifest_notices_a_rewritten_data_file(tmp_path):
    db = tmp_path / "db"
    _write_lmdb(db, {b"k": b"v"})
    cache.write_manifest(db, stage="convert_val", key="k", digest="d")
    assert cache.manifest_matches(db, "k")
    _write_lmdb(db, {b"k2": b"v2"})
    assert not cache.manifest_matches(db, "k")


def test_moved_outputs_are_taken_by_stat_or_reverified_by_content(tmp_path, caplog):
    """A copy (new path, new inode) with the recorded size and mtime is the output itself; a
    copy without its times is hashed and passes when the bytes are the same; a folder whose
    size a copy changed (filesystem bookkeeping) but whose mtime it kept passes by stat; any
    other change fails."""
    from data.lmdb_io import lmdb_content_digest

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    out = a / "imagenet_mean.binaryproto"
    out.write_bytes(b"mean bytes")
    cache.write_manifest(out, stage="mean", key="k", digest="d")
    db = a / "ilsvrc12_val_lmdb"
    _write_lmdb(db, {b"00000000_x.JPEG": b"v" * 10})
    cache.write_manifest(db, stage="convert_val", key="k", digest=lmdb_content_digest(db))
    tree = a / "val"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x.JPEG").write_bytes(b"jpeg")
    cache.write_manifest(tree, stage="extract_val", key="k", digest="k")
    assert cache.read_manifest(tree)["content"].startswith("tree:")

    shutil.copytree(a, b, copy_function=shutil.copy2)  # times kept (as cp -a)
    assert cache.stale_reason([b / "imagenet_mean.binaryproto", b / "ilsvrc12_val_lmdb"], "k") == ""
    assert cache.input_fingerprint(b / "ilsvrc12_val_lmdb") == cache.input_fingerprint(db)
    assert cache.read_manifest(b / "imagenet_mean.binaryproto")["location"] == str(
        b / "imagenet_mean.binaryproto")
    folder_stat = cache.read_manifest(b / "val")["stat"].split(":")
    manifest = cache.read_manifest(b / "val")
    manifest["stat"] = ":".join(["999999", *folder_stat[1:]])  # another folder size
    manifest["location"] = str(tree)
    cache.manifest_path(b / "val").write_text(json.dumps(manifest))
    assert cache.manifest_matches(b / "val", "k")

    c = tmp_path / "c"
    shutil.copytree(a, c, copy_function=shutil.copyfile)  # new times: hashed, same bytes
    assert cache.stale_reason([c / "imagenet_mean.binaryproto", c / "ilsvrc12_val_lmdb",
                               c / "val"], "k") == ""

    d = tmp_path / "d"
    shutil.copytree(a, d, copy_function=shutil.copyfile)
    (d / "imagenet_mean.binaryproto").write_bytes(b"other byte")  # same size
    (d / "val" / "sub" / "x.JPEG").write_bytes(b"jpeg, longer")
    os.utime(d / "val", ns=(1, 1))
    assert cache.stale_reason([d / "imagenet_mean.binaryproto"], "k") == cache.STALE_MISSING
    assert cache.stale_reason([d / "val"], "k") == cache.STALE_MISSING
    assert cache.stale_reason([d / "imagenet_mean.binaryproto"], "other key") == cache.STALE_KEY


def test_version_1_manifests_keep_their_check(tmp_path):
    """A manifest written before version 2 is used as before (exact stat), not re-verified."""
    out = tmp_path / "imagenet_mean.binaryproto"
    out.write_bytes(b"mean")
    v1 = {"version": 1, "stage": "mean", "key": "k", "digest": "d",
          "stat": cache.stat_fingerprint(out), "record": {}}
    cache.manifest_path(out).write_text(json.dumps(v1))
    assert cache.outputs_valid([out], "k") and cache.input_fingerprint(out) == "digest:d"
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(out, copy / out.name)
    shutil.copy2(cache.manifest_path(out), cache.manifest_path(copy / out.name))
    assert cache.stale_reason([copy / out.name], "k") == cache.STALE_MISSING
