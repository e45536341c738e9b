"""data/mini.py: the mini-ILSVRC12 has ILSVRC2012's shape, dirty files, and is reproducible."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image

from data import ilsvrc12
from data.errors import ImagenetError
from data.mini import (ARCHIVE_MTIME, ILSVRC_IMAGE_SIZES, IMAGE_SIZES, make_mini_ilsvrc12,
                       real_synsets)
from flows.cli import main as cli


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def train_images(train_tar) -> dict[str, bytes]:
    out = {}
    with tarfile.open(train_tar) as outer:
        for m in outer.getmembers():
            assert m.mtime == ARCHIVE_MTIME and m.uid == 0 and m.uname == ""
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner.getmembers():
                    out[f"{m.name[:-4]}/{im.name}"] = inner.extractfile(im).read()
    return out


def test_shape_of_the_archives(mini_tiny):
    with tarfile.open(mini_tiny.train_tar) as tar:
        assert tar.getnames() == [f"{w}.tar" for w in mini_tiny.synsets]
    images = train_images(mini_tiny.train_tar)
    assert len(images) == mini_tiny.train_images == 12
    for path in images:
        wnid, name = path.split("/")
        assert name.startswith(wnid + "_") and name.endswith(".JPEG")
    with tarfile.open(mini_tiny.val_tar) as tar:
        assert tar.getnames() == [ilsvrc12.VAL_NAME_FORMAT.format(i) for i in range(1, 7)]
    assert mini_tiny.synsets == [w for w, _ in real_synsets()[:3]]
    sums = ilsvrc12.parse_md5sums(mini_tiny.md5sums.read_text(), "MD5SUMS")
    assert sums == {p.name: md5(p) for p in mini_tiny.archives()}
    with tarfile.open(mini_tiny.aux_tar) as tar:
        assert sorted(tar.getnames()) == sorted(
            ["synsets.txt", "synset_words.txt", "train.txt", "val.txt", "imagenet.bet.pickle"])
        words = tar.extractfile("synset_words.txt").read().decode()
    assert words.startswith("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert gzip.open(mini_tiny.aux_tar).read(1) and mini_tiny.aux_tar.read_bytes()[4:8] == b"\0" * 4


def test_images_are_imagenet_like_and_include_the_dirty_cases(mini_tiny):
    images = train_images(mini_tiny.train_tar)
    allowed = {s for s, _ in IMAGE_SIZES}
    for path, data in images.items():
        img = Image.open(io.BytesIO(data))
        assert img.size in allowed, path
        # What convert_imageset does: OpenCV decodes every file, whatever its real format.
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape[:2] == img.size[::-1]
        assert decoded.std() > 10  # not a constant image
    kinds = {k: Image.open(io.BytesIO(images[p])) for k, p in mini_tiny.awkward.items()}
    assert (kinds["grayscale"].format, kinds["grayscale"].mode) == ("JPEG", "L")
    assert (kinds["cmyk"].format, kinds["cmyk"].mode) == ("JPEG", "CMYK")
    assert kinds["png"].format == "PNG" and mini_tiny.awkward["png"].endswith(".JPEG")
    assert len(set(images.values())) == len(images)


def test_same_seed_same_bytes_other_seed_other_bytes(mini_tiny, tmp_path):
    again = make_mini_ilsvrc12(tmp_path / "a", classes=3, train_per_class=4, val_per_class=2)
    for a, b in zip(mini_tiny.archives(), again.archives()):
        assert md5(a) == md5(b), a.name
    assert mini_tiny.md5sums.read_bytes() == again.md5sums.read_bytes()
    other = make_mini_ilsvrc12(tmp_path / "b", classes=3, train_per_class=4, val_per_class=2,
                               seed=1)
    assert md5(other.train_tar) != md5(mini_tiny.train_tar)


def test_classes_are_separable(tmp_path):
    """Even a nearest-class-mean rule on per-channel mean/std of the pixels beats chance by
    far (measured 0.90-0.93 for seeds 3, 4), so a small convnet has an easy job; 10 classes,
    6 train + 3 val each."""
    mini = make_mini_ilsvrc12(tmp_path, classes=10, train_per_class=6, val_per_class=3, seed=3)

    def feature(data: bytes) -> np.ndarray:
        # Decoded at 1/4 scale (libjpeg's DCT scaling): fast, and statistics barely change.
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)
        pixels = img.reshape(-1, 3).astype(np.float64)
        return np.concatenate([pixels.mean(0), pixels.std(0)])

    labels = ilsvrc12.labels_of(mini.synsets)
    train = [(feature(d), labels[p.split("/")[0]]) for p, d in train_images(mini.train_tar).items()]
    centroids = np.stack([np.mean([f for f, y in train if y == c], axis=0) for c in range(10)])
    with tarfile.open(mini.aux_tar) as tar:
        val_labels = dict(ilsvrc12.parse_listing(
            tar.extractfile("val.txt").read().decode().splitlines(), "val.txt"))
    with tarfile.open(mini.val_tar) as tar:
        hits = [np.argmin(((centroids - feature(tar.extractfile(m).read())) ** 2).sum(1))
                == val_labels[m.name] for m in tar.getmembers()]
    assert np.mean(hits) >= 0.7  # chance is 0.1


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ImagenetError, match="between 1 and 1000"):
        make_mini_ilsvrc12(tmp_path, classes=1001)
    with pytest.raises(ImagenetError, match="unknown --profile 'huge'; valid: mini, ilsvrc"):
        make_mini_ilsvrc12(tmp_path, classes=3, profile="huge")
    with pytest.raises(ImagenetError, match="awkward"):
        make_mini_ilsvrc12(tmp_path, classes=1, train_per_class=2, val_per_class=1)


def test_command_line(tmp_path, capsys):
    assert cli(["make-mini-ilsvrc12", str(tmp_path), "--classes", "2", "--train-per-class", "2",
                "--val-per-class", "1", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and (tmp_path / "MD5SUMS").is_file()
    assert cli(["make-mini-ilsvrc12", str(tmp_path), "--classes", "1001"]) == 1
    assert "between 1 and 1000" in capsys.readouterr().err


def test_ilsvrc_profile_has_real_photo_sizes(tmp_path):
    """Profile "ilsvrc": the sizes of real ILSVRC photos, files near their ~110 KB (measured
    ~110 KB and ~197k pixels on average over 200 images; a handful here varies more)."""
    mini = make_mini_ilsvrc12(tmp_path, classes=4, train_per_class=3, val_per_class=1,
                              profile="ilsvrc")
    images = train_images(mini.train_tar)
    allowed = {s for s, _ in ILSVRC_IMAGE_SIZES}
    plain = [d for p, d in images.items() if p not in mini.awkward.values()]
    assert all(Image.open(io.BytesIO(d)).size in allowed for d in images.values())
    assert 60_000 < np.mean([len(d) for d in plain]) < 200_000


def test_real_wnids_match_the_golden_classes(golden):
    """The golden's five classes are ILSVRC2012's first five synsets: so are the mini's."""
    assert [w for w, _ in real_synsets()[:5]] == sorted(p.name for p in (golden / "train").iterdir())
    wnids = [w for w, _ in real_synsets()]
    assert wnids == sorted(wnids) and len(set(wnids)) == len(wnids) == 1000
    assert all(ilsvrc12.WNID_RE.match(w) for w in wnids)


def test_thumb_profile_with_per_class_counts(tmp_path):
    """The full-count rehearsal's set (benchmarks/fullcount.py): 16x16 thumbnails, classes of
    different sizes as in ILSVRC2012, the counts in train.txt and in the devkit's meta.mat."""
    counts = [5, 1, 3]
    mini = make_mini_ilsvrc12(tmp_path, classes=3, val_per_class=1, profile="thumb",
                              train_counts=counts)
    images = train_images(mini.train_tar)
    assert mini.train_images == len(images) == sum(counts)
    per_class = [sum(p.startswith(w + "/") for p in images) for w in mini.synsets]
    assert per_class == counts
    assert all(Image.open(io.BytesIO(d)).size == (16, 16) for d in images.values())
    assert np.mean([len(d) for p, d in images.items() if p not in mini.awkward.values()]) < 1500
    with tarfile.open(mini.aux_tar) as tar:
        listed = tar.extractfile("train.txt").read().decode().splitlines()
    assert len(listed) == sum(counts)
    with pytest.raises(ImagenetError, match="2 counts for 3 classes"):
        make_mini_ilsvrc12(tmp_path / "bad", classes=3, train_counts=[1, 2])


def test_a_killed_build_leaves_nothing_after_the_rerun(tmp_path):
    """A kill while the mini dataset was being built left .ILSVRC2012_img_train.tar.tmp-PID
    (6 MB) that no rerun removed; its temporaries are now data.atomic's, which the rerun
    sweeps, and the rerun's archives are the uninterrupted build's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "mini"
    script = ("import sys; from data.mini import make_mini_ilsvrc12; "
              "make_mini_ilsvrc12(sys.argv[1], classes=10, train_per_class=60, val_per_class=2)")
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)],
                            env={**os.environ, "PYTHONPATH": repo})
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".") for p in out.glob(".*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary seen"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert any(p.name.startswith(".") for p in out.iterdir()), "killed before any temporary"
    make_mini_ilsvrc12(out, classes=10, train_per_class=60, val_per_class=2)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    fresh = tmp_path / "fresh"
    make_mini_ilsvrc12(fresh, classes=10, train_per_class=60, val_per_class=2)
    for archive in fresh.glob("*.tar*"):
        assert md5(archive) == md5(out / archive.name), archive.name
