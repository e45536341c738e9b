"""A data root that is copied or moved keeps its work (issue 21 item 5): every stage of the
`imagenet` flow is Cached on the copy, training included, with the same outputs; outputs whose
stat a copy did not keep are re-verified by content, not recomputed; a changed output is still
found; archives moved elsewhere with the same bytes cost their md5 check, nothing downstream.

One finished data root for the module (the tiny mirror's archives given as local paths, used in
place), copied for each test.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks import convert as convert_tasks
from tasks.cache import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
            "aux": "caffe_ilsvrc12.tar.gz"}


def statuses(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["stages"]}


def ran(result: dict) -> dict[str, str]:
    return {row["stage"]: row["why"] for row in result["stages"] if row["status"] == "ran"}


def local_params(make_params, root: Path, archives: Path, **overrides):
    from flows.imagenet import Sources

    sources = Sources(**{kind: str(archives / name) for kind, name in ARCHIVES.items()},
                      checksums=str(archives / "MD5SUMS"))
    return make_params(root, sources=sources, **overrides)


def outputs(root: Path, result: dict) -> dict:
    """What a rerun must leave as it was: LMDB digests, the mean's and the final weights'
    bytes, the scores."""
    weights = Path(result["outputs"]["final weights"])
    return {"lmdbs": {s: read_manifest(convert_tasks.lmdb_path(root, s))["digest"]
                      for s in ("train", "val")},
            "mean": convert_tasks.mean_path(root).read_bytes(),
            "weights": weights.read_bytes(), "weights_under_root": weights.is_relative_to(root),
            "top1": result["top1"], "top5": result["top5"]}


@pytest.fixture(scope="module")
def archives(tiny_mirror, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archives")
    for name in (*ARCHIVES.values(), "MD5SUMS"):
        shutil.copy2(tiny_mirror / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def finished(archives, make_params, tmp_path_factory) -> tuple[Path, dict]:
    from flows.imagenet import imagenet

    root = tmp_path_factory.mktemp("moved") / "root"
    result = imagenet(**local_params(make_params, root, archives).flow_parameters())
    assert all(status == "ran" for status in statuses(result).values())
    return root, outputs(root, result)


def rerun(make_params, root: Path, archives: Path, **overrides) -> dict:
    from flows.imagenet import imagenet

    return imagenet(**local_params(make_params, root, archives, **overrides).flow_parameters())


def test_a_copied_then_moved_root_finds_every_stage_cached(finished, archives, make_params,
                                                           tmp_path):
    root, first = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    again = rerun(make_params, copy, archives)
    assert ran(again) == {}
    assert outputs(copy, again) == first
    # The manifests now say where the outputs are, so the next check is the plain stat one.
    mean = read_manifest(convert_tasks.mean_path(copy))
    assert mean["location"] == str(convert_tasks.mean_path(copy))

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.rename(copy, moved)
    again = rerun(make_params, moved, archives)
    assert ran(again) == {}
    assert outputs(moved, again) == first


def test_a_copy_without_its_times_is_reverified_by_content(finished, archives, make_params,
                                                           tmp_path):
    """`cp -r` gives every file a new mtime: the cheap check fails everywhere, the content
    check (sha256, LMDB record digests, tree names and sizes) passes, nothing is recomputed."""
    root, first = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(root), str(copy)], check=True)
    again = rerun(make_params, copy, archives)
    assert ran(again) == {}
    assert outputs(copy, again) == first


def test_a_changed_output_in_a_copy_is_still_found(finished, archives, make_params, tmp_path):
    """The old safety stays: in a copy, a mean file with other bytes (same size, even the
    recorded mtime, written by rename as editors and our writers do) fails the content check
    and its stage reruns; a val listing edited by hand reruns the listings and what reads them."""
    root, first = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    assert ran(rerun(make_params, copy, archives)) == {}  # re-recorded at the copy's paths

    mean = convert_tasks.mean_path(copy)
    st = mean.stat()
    data = bytearray(mean.read_bytes())
    data[-1] ^= 0xFF
    tmp = mean.with_name("edited")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, mean)
    again = rerun(make_params, copy, archives)
    assert ran(again) == {"mean": "outputs missing or changed"}
    assert outputs(copy, again) == first

    val_txt = copy / "val.txt"
    val_txt.write_text(val_txt.read_text().replace(" 0\n", " 1\n", 1))
    again = rerun(make_params, copy, archives)
    assert "listings" in ran(again) and ran(again)["listings"] == "outputs missing or changed"
    assert (copy / "val.txt").read_text() == (root / "val.txt").read_text()


def test_archives_moved_with_the_same_bytes_cost_only_their_check(finished, archives,
                                                                 make_params, tmp_path):
    """The archives given as local paths move to another folder (another disk): the download
    stages verify them there by md5 and point downloads/ at them; extraction and everything
    after it stays cached."""
    root, first = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    moved = tmp_path / "other-disk"
    os.rename(archives, moved)
    try:
        for name in ARCHIVES.values():  # as a copy to another disk may leave them
            os.utime(moved / name, ns=(1, 1))
        again = rerun(make_params, copy, moved)
        assert ran(again) == {f"download-{kind}": "outputs missing or changed"
                              for kind in ARCHIVES}
        assert outputs(copy, again) == first
        assert os.readlink(copy / "downloads" / ARCHIVES["val"]) == str(moved / ARCHIVES["val"])
    finally:
        os.rename(moved, archives)


def test_the_mini_source_links_inside_the_root(make_params, tmp_path):
    """`sources: mini:tiny` builds the mini under the data root: downloads/ links to it with a
    relative path, so the root moves as one piece."""
    from flows.imagenet import Sources, imagenet

    mini = Sources(train="mini:tiny", val="mini:tiny", aux="mini:tiny")
    root = tmp_path / "root"
    params = make_params(root, sources=mini, stages=["download"])
    imagenet(**params.flow_parameters())
    link = root / "downloads" / ARCHIVES["train"]
    assert not os.path.isabs(os.readlink(link)) and link.is_file()
    moved = tmp_path / "moved"
    os.rename(root, moved)
    again = imagenet(**make_params(moved, sources=mini, stages=["download"]).flow_parameters())
    assert statuses(again) == {name: "cached" for name in
                               ("mini-ilsvrc12", "download-train", "download-val", "download-aux")}
