"""data.images.resize: NVIDIA DIGITS's resize modes (squash, crop, fill, half_crop) on OpenCV's
INTER_LINEAR, and convert_imageset --resize_mode. Squash is Caffe's resize, byte for byte."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from data import images
from data.convert import convert_imageset
from data.datum import decode_datum_bytes
from data.errors import ImagenetError
from data.lmdb_io import LmdbReader


def _stripes(h: int, w: int, channels: int = 3) -> np.ndarray:
    """An image whose columns (wide) or rows (tall) are numbered, so crops are easy to see."""
    rng = np.random.default_rng(h * 1000 + w)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
@pytest.mark.parametrize("shape", [(30, 40, 3), (40, 30, 3), (33, 17), (7, 200, 3), (200, 3, 3),
                                   (1, 500, 3), (64, 64, 3)])
@pytest.mark.parametrize("target", [(16, 16), (20, 31), (5, 5)])
def test_every_mode_gives_the_target_size_and_channels(mode, shape, target) -> None:
    img = _stripes(*shape[:2], channels=shape[2] if len(shape) == 3 else 1)
    out = images.resize(img, *target, mode, noise_seed=1)
    assert out.shape[:2] == target and out.shape[2:] == img.shape[2:] and out.dtype == np.uint8


def test_squash_is_caffes_resize() -> None:
    img = _stripes(30, 40)
    want = cv2.resize(img, (20, 10), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(images.resize(img, 10, 20, images.SQUASH), want)


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_same_aspect_ratio_is_squashed_in_every_mode(mode) -> None:
    img = _stripes(40, 60)
    want = cv2.resize(img, (30, 20), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(images.resize(img, 20, 30, mode), want)


def test_crop_resizes_the_short_side_then_cuts_the_centre() -> None:
    wide = _stripes(20, 40)  # ratios: width 2.0, height 1.0 -> resize to 20x40, keep cols 10..30
    assert np.array_equal(images.resize(wide, 20, 20, images.CROP), wide[:, 10:30])
    tall = _stripes(45, 20)  # width ratio 1.0 -> 45x20, rows 12.5 -> 13 (DIGITS rounds halves up)
    assert np.array_equal(images.resize(tall, 20, 20, images.CROP), tall[13:33, :])


def test_fill_fits_the_image_and_pads_both_sides_with_noise() -> None:
    wide = _stripes(20, 40)  # width ratio 2 -> 10x40 -> 10x20, 5 rows of noise above and below
    out = images.resize(wide, 20, 20, images.FILL, noise_seed=5)
    assert np.array_equal(out[5:15], cv2.resize(wide, (20, 10), interpolation=cv2.INTER_LINEAR))
    noise = np.concatenate([out[:5], out[15:]])
    assert noise.max() < images.NOISE_HIGH and noise.std() > 50  # uniform over 0..254
    # an odd gap is made even by growing the image a pixel, as DIGITS does: 21 -> 11 + 2 x 5
    odd = images.resize(_stripes(21, 40), 21, 20, images.FILL, noise_seed=5)
    assert odd.shape == (21, 20, 3)
    # the same seed (in convert: the file's bytes) gives the same padding
    assert np.array_equal(images.resize(wide, 20, 20, images.FILL, noise_seed=5), out)
    assert not np.array_equal(images.resize(wide, 20, 20, images.FILL, noise_seed=6), out)


def test_half_crop_takes_half_of_each_distortion() -> None:
    wide = _stripes(20, 40)  # ratios 2 and 1 -> 1.5: 13x27, +1 row for an even gap -> 14x27
    out = images.resize(wide, 20, 20, images.HALF_CROP, noise_seed=2)
    resized = cv2.resize(wide, (27, 14), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out[3:17], resized[:, 4:24])  # centre of 27 at round(3.5) = 4
    gray = images.resize(_stripes(20, 40, channels=1), 20, 20, images.HALF_CROP)
    assert gray.shape == (20, 20)


def test_unknown_mode_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ImagenetError, match="squash, crop, fill, half_crop"):
        images.resize(_stripes(4, 4), 2, 2, "zoom")


def test_convert_imageset_resize_mode(tmp_path) -> None:
    """Every mode through convert_imageset: each record is resize() of the decoded image, the
    same for one worker or two; squash is the default and gives Caffe's records."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i, (h, w) in enumerate([(30, 50), (50, 30), (24, 24), (17, 61)]):
        ok, buf = cv2.imencode(".png", _stripes(h, w))
        (folder / f"{i}.png").write_bytes(buf.tobytes())
        lines.append(f"{i}.png {i % 2}\n")
    (tmp_path / "list.txt").write_text("".join(lines))

    def records(mode, workers, name):
        db = tmp_path / name
        convert_imageset(str(folder) + "/", tmp_path / "list.txt", db, resize_height=16,
                         resize_width=20, resize_mode=mode, workers=workers, check_space=False)
        with LmdbReader(db) as reader:
            return dict(iter(reader))

    default = records(images.SQUASH, 1, "default")
    for mode in images.RESIZE_MODES:
        one, two = records(mode, 1, f"{mode}1"), records(mode, 2, f"{mode}2")
        assert one == two
        for i in range(4):
            key = f"{i:08d}_{i}.png".encode()
            chw, label = decode_datum_bytes(one[key])
            data = (folder / f"{i}.png").read_bytes()
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            want = images.resize(pixels, 16, 20, mode, noise_seed=images.noise_seed(data))
            assert label == i % 2
            assert np.array_equal(chw, want.transpose(2, 0, 1)), (mode, i)
        if mode == images.SQUASH:
            assert one == default
    with pytest.raises(ImagenetError, match="--resize_mode='zoom'"):
        convert_imageset(str(folder) + "/", tmp_path / "list.txt", tmp_path / "bad",
                         resize_height=16, resize_width=20, resize_mode="zoom")
