"""data/extract.py: the mini train/val tars, a SIGKILL mid-way, and hostile archives."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data import extract as ex
from data.errors import ImagenetError

REPO = Path(__file__).resolve().parents[2]


def expected_train_tree(train_tar: Path) -> dict[str, bytes]:
    """{wnid/file: bytes} read straight from the nested tar."""
    out = {}
    with tarfile.open(train_tar) as outer:
        for m in outer.getmembers():
            wnid = m.name.removesuffix(".tar")
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner.getmembers():
                    out[f"{wnid}/{im.name}"] = inner.extractfile(im).read()
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_extract_train_builds_the_tree_and_rerun_skips(mini_tiny, tmp_path):
    seen = []
    result = ex.extract_train(mini_tiny.train_tar, tmp_path,
                              progress=lambda d, t: seen.append((d, t)))
    want = expected_train_tree(mini_tiny.train_tar)
    assert tree(tmp_path / "train") == want
    assert result.files == len(want) == mini_tiny.train_images
    assert result.bytes == sum(len(b) for b in want.values())
    assert result.synsets_extracted == 3 and result.synsets_skipped == 0
    outer_sizes = sum(m.size for m in tarfile.open(mini_tiny.train_tar).getmembers())
    assert seen[-1] == (outer_sizes, outer_sizes)
    assert all(ex.synset_complete(tmp_path, w) for w in mini_tiny.synsets)
    assert list((tmp_path / ".extract-state" / "tmp").iterdir()) == []

    again = ex.extract_train(mini_tiny.train_tar, tmp_path)
    assert (again.files, again.synsets_skipped) == (0, 3)


@pytest.mark.parametrize("workers,compress", [(1, False), (3, False), (3, True)])
def test_same_tree_for_any_worker_count_and_compressed_outer_tars(mini_tiny, tmp_path, workers,
                                                                  compress):
    """Synsets are read at their own offsets by `workers` threads (a gzip outer tar: in one
    stream); the tree, the counts and the final progress are the same."""
    import gzip

    archive = mini_tiny.train_tar
    if compress:
        archive = tmp_path / "train.tar.gz"
        archive.write_bytes(gzip.compress(mini_tiny.train_tar.read_bytes()))
    seen = []
    result = ex.extract_train(archive, tmp_path / "out", workers=workers,
                              progress=lambda d, t: seen.append((d, t)))
    want = expected_train_tree(mini_tiny.train_tar)
    assert tree(tmp_path / "out" / "train") == want
    assert (result.files, result.synsets_extracted) == (len(want), 3)
    assert seen[-1][0] == seen[-1][1]
    with pytest.raises(ImagenetError, match="workers must be >= 1, got 0"):
        ex.extract_train(archive, tmp_path / "out", workers=0)


KILL_SCRIPT = """
import sys, time
from data.extract import extract_train
def progress(done, total):
    if done >= total // 2:
        print("HALF", flush=True)
        time.sleep(120)
# One worker: progress per file, so the kill lands inside a synset (worker processes report a
# synset when it is done).
extract_train(sys.argv[1], sys.argv[2], progress=progress, workers=1)
"""


def test_extraction_killed_midway_then_rerun_completes(mini_tiny, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(mini_tiny.train_tar),
                              str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    done = [w for w in mini_tiny.synsets if ex.synset_complete(tmp_path, w)]
    assert 1 <= len(done) < 3  # killed inside a later synset
    half_written = list((tmp_path / ".extract-state" / "tmp").iterdir())
    assert half_written  # the synset being extracted was left in the work dir, not train/

    result = ex.extract_train(mini_tiny.train_tar, tmp_path)
    assert result.synsets_skipped == len(done)
    assert result.synsets_extracted == 3 - len(done)
    assert tree(tmp_path / "train") == expected_train_tree(mini_tiny.train_tar)
    assert list((tmp_path / ".extract-state" / "tmp").iterdir()) == []


def test_folder_without_marker_is_not_trusted(mini_tiny, tmp_path):
    ex.extract_train(mini_tiny.train_tar, tmp_path)
    wnid = mini_tiny.synsets[1]
    (tmp_path / ".extract-state" / "train" / f"{wnid}.done").unlink()
    stray = tmp_path / "train" / wnid / "half_written.JPEG"
    stray.write_bytes(b"junk")
    result = ex.extract_train(mini_tiny.train_tar, tmp_path)
    assert (result.synsets_extracted, result.synsets_skipped) == (1, 2)
    assert not stray.exists()
    assert tree(tmp_path / "train") == expected_train_tree(mini_tiny.train_tar)


def test_extract_val_flat_and_resumable(mini_tiny, tmp_path):
    result = ex.extract_val(mini_tiny.val_tar, tmp_path)
    with tarfile.open(mini_tiny.val_tar) as tar:
        want = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert tree(tmp_path / "val") == want and result.files == mini_tiny.val_images
    first = sorted(want)[0]
    (tmp_path / "val" / first).unlink()
    again = ex.extract_val(mini_tiny.val_tar, tmp_path)
    assert (again.files, again.skipped_files) == (1, len(want) - 1)
    assert tree(tmp_path / "val") == want


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def hostile_members(tmp_path: Path) -> dict[str, tarfile.TarInfo]:
    return {
        "dotdot": _info("../evil.JPEG"),
        "nested_dotdot": _info("a/../../evil.JPEG"),
        "absolute": _info(str(tmp_path / "abs_evil.JPEG")),
        "symlink": _info("link.JPEG", tarfile.SYMTYPE, str(tmp_path / "evil_target")),
        "hardlink": _info("hard.JPEG", tarfile.LNKTYPE, "/etc/passwd"),
        "device": _info("dev.JPEG", tarfile.CHRTYPE),
        "fifo": _info("fifo.JPEG", tarfile.FIFOTYPE),
    }


EXPECTED_WORDS = {"dotdot": "'..'", "nested_dotdot": "'..'", "absolute": "absolute",
                  "symlink": "symlink", "hardlink": "hard link", "device": "device",
                  "fifo": "FIFO"}


@pytest.mark.parametrize("case", sorted(EXPECTED_WORDS))
def test_hostile_members_are_refused_before_writing(case, tmp_path):
    evil = hostile_members(tmp_path)[case]
    data = b"evil" if evil.isreg() else None
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(_tar_bytes([(_info("good.JPEG"), b"ok"), (evil, data)]))
    dest = tmp_path / "out" / "deeper"
    with pytest.raises(ImagenetError, match=EXPECTED_WORDS[case]) as err:
        ex.extract_archive(archive, dest)
    assert repr(evil.name)[1:-1] in str(err.value) or evil.name in str(err.value)
    # Checked up front: nothing at all was written, inside or outside.
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("**/evil*")) and not (tmp_path / "abs_evil.JPEG").exists()
    with pytest.raises(ImagenetError, match=EXPECTED_WORDS[case]):
        ex.extract_val(archive, tmp_path / "root")


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_hostile_member_inside_a_synset_tar_is_refused(case, tmp_path):
    evil = hostile_members(tmp_path)[case]
    inner = _tar_bytes([(_info("n01440764_1.JPEG"), b"ok"),
                        (evil, b"evil" if evil.isreg() else None)])
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    archive.write_bytes(_tar_bytes([(_info("n01440764.tar"), inner)]))
    root = tmp_path / "root"
    with pytest.raises(ImagenetError, match=EXPECTED_WORDS[case]):
        ex.extract_train(archive, root)
    assert not list(tmp_path.glob("**/evil*")) and not (tmp_path / "abs_evil.JPEG").exists()
    assert not (root / "train" / "n01440764").exists()  # the synset never looked finished


def test_outer_member_must_be_a_synset_tar(mini_tiny, tmp_path):
    with pytest.raises(ImagenetError, match="not a per-synset tar"):
        ex.extract_train(mini_tiny.val_tar, tmp_path)
    assert not (tmp_path / "train").exists()


def test_free_space_is_checked_first(mini_tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    need = sum(m.size for m in tarfile.open(mini_tiny.train_tar).getmembers())
    with pytest.raises(ImagenetError, match=f"need {need:,} bytes, 1,000 free"):
        ex.extract_train(mini_tiny.train_tar, tmp_path)
    assert not list((tmp_path / "train").iterdir())


def test_extract_dispatch(mini_tiny, tmp_path):
    assert ex.guess_kind(mini_tiny.train_tar) == "train"
    assert ex.guess_kind(mini_tiny.val_tar) == "val"
    assert ex.guess_kind(mini_tiny.aux_tar) == "archive"
    result = ex.extract(mini_tiny.devkit_tar, tmp_path)
    assert (tmp_path / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").is_file()
    assert result.files == 2
    with pytest.raises(ImagenetError, match="valid: auto, train, val, archive"):
        ex.extract(mini_tiny.devkit_tar, tmp_path, kind="zip")


@pytest.mark.parametrize("members", [
    [("a", b"x"), ("a/b", b"y")],           # a file, then a member inside it
    [("d/a/b", b"y"), ("d/a", b"x")],       # a member inside a folder, then a file of its name
])
def test_member_that_needs_a_file_to_be_a_folder_is_refused(members, tmp_path):
    archive = tmp_path / "clash.tar"
    archive.write_bytes(_tar_bytes([(_info(n), d) for n, d in members]))
    with pytest.raises(ImagenetError, match=r"is a file, but member .* needs .* to be a folder"):
        ex.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _damaged(tmp_path: Path, how: str) -> Path:
    """A tar of 4 members, damaged so that tarfile alone would end it silently or late."""
    payload = _tar_bytes([(_info(f"f{i}.JPEG"), bytes([i]) * 3000) for i in range(4)])
    third = 3 * (512 + 3072)  # offset of the 4th header (3000 bytes pad to 3072)
    if how == "header":  # a damaged header after the first member: tarfile stops there
        payload = payload[:third] + b"garbage!" + payload[third + 8:]
    elif how == "boundary":  # cut exactly before a header: no end-of-archive blocks
        payload = payload[:third]
    path = tmp_path / f"{how}.tar"
    path.write_bytes(payload)
    if how in ("gz_trailer", "gz_middle"):
        import gzip

        packed = gzip.compress(payload)
        cut = len(packed) - 4 if how == "gz_trailer" else len(packed) // 2
        path = tmp_path / f"{how}.tar.gz"
        path.write_bytes(packed[:cut])
    return path


@pytest.mark.parametrize("how", ["header", "boundary", "gz_trailer", "gz_middle"])
def test_damaged_or_cut_archive_is_an_error_and_writes_nothing(how, tmp_path):
    """tarfile ends an archive silently at a damaged header, at a cut on a header boundary,
    and never reads gzip's trailer: each used to extract the first members with success."""
    archive = _damaged(tmp_path, how)
    with pytest.raises(ImagenetError, match="corrupt or truncated archive.*nothing was written"):
        ex.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_destination_is_one_line_naming_it(tmp_path):
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar_bytes([(_info("a/b.JPEG"), b"x")]))
    (tmp_path / "out").write_text("a file where the folder should be")
    with pytest.raises(ImagenetError, match=r"cannot create folder .*out: .*\(EEXIST|ENOTDIR\)"):
        ex.extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file where the folder should be"
