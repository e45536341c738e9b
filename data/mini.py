"""The mini-ILSVRC12 generator: a small dataset with exactly ILSVRC2012's shape, for the demo and
the tests (no machine here can reach image-net.org).

It writes, byte-for-byte reproducibly for a given seed:
- `ILSVRC2012_img_train.tar`: a tar of per-synset tars `<wnid>.tar`, each holding
  `<wnid>_<id>.JPEG` (like the real 147 GB archive);
- `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_<8 digits>.JPEG`;
- `caffe_ilsvrc12.tar.gz`: Caffe's aux tarball (synsets.txt, synset_words.txt, train.txt,
  val.txt, and an `imagenet.bet.pickle` that must never be unpickled);
- `ILSVRC2012_devkit_t12.tar.gz`: `data/meta.mat` (MAT v5, synsets with ILSVRC2012_IDs in a
  shuffled, NOT WNID-sorted order, plus one non-leaf node) and
  `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per val image);
- `LOC_val_solution.csv` and `LOC_synset_mapping.txt` (Kaggle's layout);
- `MD5SUMS` for the four archives.

Images are mostly 500x375 / 375x500 JPEGs (profile "mini"; profile "ilsvrc" draws the sizes,
pixel counts and ~110 KB file sizes of real ILSVRC2012 photos, for benchmarks/scale.py). Any
number of the 1000 real WNIDs (data/ilsvrc12_synset_words.txt) can be used. Each class is a
shape/texture (circle, stripes, checker...) in a class palette, at a random position, scale and rotation, over a noisy gradient:
a small convnet learns them at 64x64 within a few hundred iterations, and no two images are alike.
Every dataset contains the dirty files real ILSVRC2012 has: a grayscale JPEG, a CMYK JPEG and a
PNG named .JPEG (like n02105855_2933.JPEG).
"""
from __future__ import annotations

import colorsys
import functools
import csv
import gzip
import hashlib
import io
import pickle
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from data import ilsvrc12
from data.atomic import open_atomic
from data.errors import ImagenetError
from data.devkit_meta import format_meta

# Caffe's synset_words.txt for ILSVRC2012: the 1000 WNIDs in ASCII order with their WordNet
# words (the same lines as the aux tarball's file, which this generator re-creates).
SYNSET_WORDS_FILE = Path(__file__).with_name("ilsvrc12_synset_words.txt")


@functools.lru_cache(maxsize=1)
def real_synsets() -> tuple[tuple[str, str], ...]:
    """The 1000 ILSVRC2012 (WNID, words) pairs in synsets.txt order."""
    pairs = tuple(tuple(line.split(" ", 1)) for line in
                  SYNSET_WORDS_FILE.read_text(encoding="ascii").splitlines() if line)
    if len(pairs) != ilsvrc12.ILSVRC2012_CLASSES:
        raise ImagenetError(f"{SYNSET_WORDS_FILE}: {len(pairs)} synsets, expected "
                            f"{ilsvrc12.ILSVRC2012_CLASSES} (the package data is damaged)")
    return pairs  # type: ignore[return-value]


# WordNet's root, used as the one non-leaf synset of the mini meta.mat (the real one has 860).
ROOT_SYNSET = ("n00001740", "entity")

# Named sizes: (classes, train_per_class, val_per_class).
SIZES: dict[str, tuple[int, int, int]] = {"default": (10, 100, 20), "tiny": (3, 4, 2)}

# (width, height) of the images and how often each occurs; ILSVRC's typical photo is 500x375.
IMAGE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((500, 375), 0.60), ((375, 500), 0.20), ((500, 333), 0.08), ((500, 400), 0.06),
    ((333, 500), 0.04), ((500, 500), 0.02),
)
# Real ILSVRC2012 train photos: ~110 KB and ~200k pixels on average, most 500 px on the long
# side, a tail of larger camera sizes and some small ones (the scale benchmark's profile).
ILSVRC_IMAGE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((500, 375), 0.42), ((375, 500), 0.12), ((500, 333), 0.10), ((333, 500), 0.04),
    ((500, 500), 0.06), ((640, 480), 0.07), ((480, 640), 0.03), ((800, 600), 0.03),
    ((1024, 768), 0.01), ((400, 300), 0.08), ((300, 225), 0.04),
)


@dataclass(frozen=True)
class Profile:
    """How the images look on disk: their sizes, JPEG quality and fine full-resolution grain
    (which is what makes real photos ~110 KB rather than the smooth drawings' ~30 KB)."""

    sizes: tuple[tuple[tuple[int, int], float], ...]
    jpeg_quality: int
    grain_sigma: float  # std of the full-resolution grain added before encoding (0: none)


# Thumbnails: ILSVRC2012's counts and layout at ~0.7 KB an image (benchmarks/fullcount.py puts
# all 1,331,167 images on one small disk with them).
THUMB_IMAGE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (((16, 16), 1.0),)
# Named looks of the images: "mini" (small files: the demo and the tests), "ilsvrc" (the
# sizes and pixel counts of real ILSVRC2012 photos, for benchmarks/scale.py) and "thumb" (16x16
# thumbnails, for the full-count rehearsal).
PROFILES: dict[str, Profile] = {
    "mini": Profile(IMAGE_SIZES, 85, 0.0),
    "ilsvrc": Profile(ILSVRC_IMAGE_SIZES, 94, 11.0),
    "thumb": Profile(THUMB_IMAGE_SIZES, 90, 0.0),
}
# The grain comes from one tile drawn per seed (crops of it per image): drawing fresh noise for
# every pixel of every image would double the generation time.
GRAIN_TILE = 1024
# Shapes are drawn at 1/DRAW_DOWNSCALE resolution and upsampled: it keeps generation fast and
# gives soft, photo-like edges.
DRAW_DOWNSCALE = 4
JPEG_QUALITY = 85
TRAIN_ID_RANGE = (1, 15_000)  # real train ids go up to ~15k (n01440764_10026.JPEG)
ARCHIVE_MTIME = 1_336_003_200  # 2012-05-03, fixed so archive bytes (and md5s) are reproducible
NOISE_SIGMA = 14.0  # per-pixel noise (at draw resolution, so it becomes texture)
COLOR_JITTER = 12.0  # per-image shift of the class colours (std, 0-255 scale)
OBJECT_SCALE = (0.22, 0.42)  # object half-size as a fraction of the shorter side
MAX_ROTATION = 0.35  # radians either way
GRADIENT_STRENGTH = 40.0  # std of the background's linear brightness ramp across the image
SHAPES = ("circle", "square", "triangle", "hstripes", "vstripes", "diagonal", "checker", "ring",
          "cross", "dots")
BG_VALUES = (0.3, 0.5, 0.7)
AWKWARD = ("grayscale", "cmyk", "png")


@dataclass
class MiniResult:
    """What make_mini_ilsvrc12 wrote."""

    outdir: Path
    train_tar: Path
    val_tar: Path
    aux_tar: Path
    devkit_tar: Path
    ground_truth: Path  # plain copy of the devkit's data/ILSVRC2012_validation_ground_truth.txt
    val_solution: Path  # Kaggle LOC_val_solution.csv
    synset_mapping: Path  # Kaggle LOC_synset_mapping.txt
    md5sums: Path
    synsets: list[str]
    train_images: int
    val_images: int
    awkward: dict[str, str] = field(default_factory=dict)  # kind -> train path (wnid/file)
    seconds: float = 0.0

    def archives(self) -> list[Path]:
        return [self.train_tar, self.val_tar, self.aux_tar, self.devkit_tar]


def _class_style(index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(shape, foreground RGB, background RGB) of class `index`: shapes cycle, hues spread by
    the golden ratio so neighbouring classes never share a palette, and the background (the
    opposite hue) takes one of three brightnesses."""
    hue = (index * 0.6180339887) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95)) * 255
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, BG_VALUES[index % len(BG_VALUES)]))
    return SHAPES[index % len(SHAPES)], fg, bg * 255


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in shape coordinates (u, v in about [-1, 1])."""
    box = np.maximum(np.abs(u), np.abs(v)) < 1.0
    r2 = u * u + v * v
    if shape == "circle":
        return r2 < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "triangle":
        return (v > -0.8) & (v < 0.8) & (np.abs(u) < (v + 0.8) * 0.6)
    if shape == "hstripes":
        return box & (np.floor(v * 3) % 2 == 0)
    if shape == "vstripes":
        return box & (np.floor(u * 3) % 2 == 0)
    if shape == "diagonal":
        return box & (np.floor((u + v) * 2.5) % 2 == 0)
    if shape == "checker":
        return box & ((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0)
    if shape == "ring":
        return (r2 < 1.0) & (r2 > 0.36)
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
    if shape == "dots":
        fu, fv = (u * 2.5) % 1.0 - 0.5, (v * 2.5) % 1.0 - 0.5
        return box & (fu * fu + fv * fv < 0.1)
    raise ImagenetError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=len(IMAGE_SIZES) + len(ILSVRC_IMAGE_SIZES) + len(THUMB_IMAGE_SIZES))
def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


@functools.lru_cache(maxsize=2)
def _grain_tile(seed: int, sigma: float) -> np.ndarray:
    tile = np.random.default_rng([seed, 7]).normal(0, sigma, (GRAIN_TILE, GRAIN_TILE, 3))
    return np.round(tile).astype(np.int16)


def _size_probs(sizes: tuple[tuple[tuple[int, int], float], ...]) -> np.ndarray:
    weights = np.array([p for _, p in sizes])
    return weights / weights.sum()


def render_image(class_index: int, rng: np.random.Generator, profile: Profile = PROFILES["mini"],
                 seed: int = 0) -> tuple[Image.Image, tuple]:
    """One RGB image of class `class_index` and its object box (x0, y0, x1, y1); `seed` picks
    the grain tile of profiles that have grain."""
    sizes = profile.sizes
    width, height = sizes[rng.choice(len(sizes), p=_size_probs(sizes))][0]
    w, h = width // DRAW_DOWNSCALE, height // DRAW_DOWNSCALE
    shape, fg, bg = _class_style(class_index)
    fg = np.clip(fg + rng.normal(0, COLOR_JITTER, 3), 0, 255).astype(np.float32)
    bg = np.clip(bg + rng.normal(0, COLOR_JITTER, 3), 0, 255).astype(np.float32)
    yy, xx = _grid(w, h)
    size = rng.uniform(*OBJECT_SCALE) * min(w, h)
    cx = rng.uniform(size, w - size)
    cy = rng.uniform(size, h - size)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    c, s = np.float32(np.cos(angle) / size), np.float32(np.sin(angle) / size)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    mask = _mask(shape, c * dx + s * dy, c * dy - s * dx)[..., None]
    # Background: the class colour with a random linear gradient, so position cues vary.
    gx, gy = rng.normal(0, GRADIENT_STRENGTH, 2).astype(np.float32)
    grad = (gx / w) * xx + (gy / h) * yy - np.float32((gx + gy) / 2)
    img = np.where(mask, fg, bg + grad[..., None])
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE_SIGMA)
    small = np.clip(img, 0, 255).astype(np.uint8)
    box = tuple(int(round(v * DRAW_DOWNSCALE)) for v in
                (cx - size, cy - size, cx + size, cy + size))
    # OpenCV's upsampling is ~10x faster than Pillow's here and generation time matters (demo).
    full = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if profile.grain_sigma > 0:
        tile = _grain_tile(seed, profile.grain_sigma)
        y0 = int(rng.integers(0, GRAIN_TILE - height + 1))
        x0 = int(rng.integers(0, GRAIN_TILE - width + 1))
        grain = tile[y0:y0 + height, x0:x0 + width]
        full = np.clip(full + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(full, "RGB"), box


def encode(image: Image.Image, awkward: str | None = None, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of `image`, or one of the dirty variants real ILSVRC2012 contains."""
    buf = io.BytesIO()
    if awkward is None:
        image.save(buf, "JPEG", quality=quality)
    elif awkward == "grayscale":
        image.convert("L").save(buf, "JPEG", quality=quality)
    elif awkward == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif awkward == "png":  # like n02105855_2933.JPEG: a PNG under a .JPEG name
        image.save(buf, "PNG", compress_level=1)
    else:
        raise ImagenetError(f"unknown awkward image kind {awkward!r}; valid: {', '.join(AWKWARD)}")
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, ARCHIVE_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _open_tar(fileobj: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)


def _write_tar_gz(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A .tar.gz whose bytes depend only on `members` (gzip mtime 0, no file name stored),
    written atomically."""
    with open_atomic(path, durable=False) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 mtime=0) as gz, _open_tar(gz) as tar:
        for name, data in members:
            _add_bytes(tar, name, data)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_mini_ilsvrc12(
    outdir: Path,
    *,
    classes: int = SIZES["default"][0],
    train_per_class: int = SIZES["default"][1],
    val_per_class: int = SIZES["default"][2],
    seed: int = 0,
    profile: str = "mini",
    progress: Callable[[int, int], None] | None = None,
    train_counts: Sequence[int] | None = None,
) -> MiniResult:
    """Write a mini ILSVRC2012 into `outdir` (see the module docstring); `progress(done, total)`
    is called per image; `profile` (PROFILES) sets the images' sizes and file sizes;
    `train_counts` (one per class) replaces `train_per_class` where classes differ in size, as
    ILSVRC2012's do (732 to 1300). The same arguments always give byte-identical files."""
    start = time.monotonic()
    known = real_synsets()
    if not 1 <= classes <= len(known):
        raise ImagenetError(f"--classes {classes}: must be between 1 and {len(known)} "
                            "(ILSVRC2012's real WNIDs)")
    if profile not in PROFILES:
        raise ImagenetError(f"unknown --profile {profile!r}; valid: {', '.join(PROFILES)}")
    look = PROFILES[profile]
    counts = [train_per_class] * classes if train_counts is None else [int(n) for n in train_counts]
    if len(counts) != classes:
        raise ImagenetError(f"train_counts: {len(counts)} counts for {classes} classes")
    if min(counts) < 1 or val_per_class < 1:
        raise ImagenetError(f"--train-per-class {min(counts)} / --val-per-class "
                            f"{val_per_class}: need at least one image of each")
    if sum(counts) < len(AWKWARD) or min(counts) * classes < len(AWKWARD):
        raise ImagenetError(f"{classes} x {min(counts)} train images: need at least "
                            f"{len(AWKWARD)} to hold the awkward cases ({', '.join(AWKWARD)})")
    id_span = TRAIN_ID_RANGE[1] - TRAIN_ID_RANGE[0]
    if max(counts) > id_span:
        raise ImagenetError(f"--train-per-class {max(counts)}: at most {id_span}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    chosen = known[:classes]
    synsets = [w for w, _ in chosen]
    words = dict(chosen)
    total = sum(counts) + classes * val_per_class
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # The awkward files go to the first images of the first classes (spread over classes).
    awkward_at = {(k % classes, k // classes): kind for k, kind in enumerate(AWKWARD)}
    awkward_paths: dict[str, str] = {}
    train_entries: list[tuple[str, int]] = []

    train_tar = outdir / ilsvrc12.TRAIN_ARCHIVE
    with open_atomic(train_tar, durable=False) as raw, _open_tar(raw) as outer:
        for label, wnid in enumerate(synsets):
            rng = np.random.default_rng([seed, 1, label])
            ids = np.sort(rng.choice(np.arange(*TRAIN_ID_RANGE), counts[label], replace=False))
            inner_buf = io.BytesIO()
            with _open_tar(inner_buf) as inner:
                for k, image_id in enumerate(ids):
                    name = f"{wnid}_{int(image_id)}.JPEG"
                    img_rng = np.random.default_rng([seed, 2, label, k])
                    image, _ = render_image(label, img_rng, look, seed)
                    kind = awkward_at.get((label, k))
                    if kind:
                        awkward_paths[kind] = f"{wnid}/{name}"
                    _add_bytes(inner, name, encode(image, kind, look.jpeg_quality))
                    train_entries.append((f"{wnid}/{name}", label))
                    tick()
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())

    # Val: each class val_per_class times, in a seeded shuffle (like the real val set).
    n_val = classes * val_per_class
    val_labels = np.random.default_rng([seed, 3]).permutation(
        np.repeat(np.arange(classes), val_per_class))
    val_entries: list[tuple[str, int]] = []
    boxes: list[tuple[str, str, tuple, tuple[int, int]]] = []
    val_tar = outdir / ilsvrc12.VAL_ARCHIVE
    with open_atomic(val_tar, durable=False) as raw, _open_tar(raw) as tar:
        for i in range(1, n_val + 1):
            label = int(val_labels[i - 1])
            name = ilsvrc12.VAL_NAME_FORMAT.format(i)
            image, box = render_image(label, np.random.default_rng([seed, 4, i]), look, seed)
            _add_bytes(tar, name, encode(image, quality=look.jpeg_quality))
            val_entries.append((name, label))
            boxes.append((name, synsets[label], box, image.size))
            tick()

    # Caffe's aux tarball: the listings plus the pickle nobody may load.
    train_entries.sort(key=lambda e: e[0])  # Caffe's train.txt is sorted by path
    aux_members = [
        (ilsvrc12.SYNSETS_FILE, "".join(f"{w}\n" for w in synsets).encode()),
        (ilsvrc12.SYNSET_WORDS_FILE, "".join(f"{w} {words[w]}\n" for w in synsets).encode()),
        (ilsvrc12.TRAIN_LIST, ilsvrc12.format_listing(train_entries).encode()),
        (ilsvrc12.VAL_LIST, ilsvrc12.format_listing(val_entries).encode()),
        ("imagenet.bet.pickle", pickle.dumps({"mini-ilsvrc12": "never unpickle aux files"}, 2)),
    ]
    aux_tar = outdir / ilsvrc12.AUX_ARCHIVE
    _write_tar_gz(aux_tar, aux_members)

    # Devkit: ILSVRC2012_IDs are a seeded permutation, so ID order != sorted WNID order (the
    # trap of the real devkit); the ground truth holds IDs, not Caffe labels.
    ids = np.random.default_rng([seed, 5]).permutation(classes) + 1
    if classes > 1 and np.array_equal(ids, np.arange(1, classes + 1)):
        ids = np.roll(ids, 1)  # never let ID order coincide with label order
    leaves = [dict(ILSVRC2012_ID=float(ids[k]), WNID=w, words=words[w], gloss="",
                   num_children=0.0, children=[], wordnet_height=0.0,
                   num_train_images=float(counts[k])) for k, w in enumerate(synsets)]
    leaves.sort(key=lambda s: s["ILSVRC2012_ID"])  # meta.mat lists synsets by ID
    root = dict(ILSVRC2012_ID=float(classes + 1), WNID=ROOT_SYNSET[0], words=ROOT_SYNSET[1],
                gloss="", num_children=float(classes), children=[float(i) for i in sorted(ids)],
                wordnet_height=1.0, num_train_images=0.0)
    meta = format_meta(leaves + [root])
    ground_truth_text = "".join(f"{int(ids[lab])}\n" for _, lab in val_entries)
    devkit_tar = outdir / ilsvrc12.DEVKIT_ARCHIVE
    _write_tar_gz(devkit_tar, [
        (f"{ilsvrc12.DEVKIT_DIR}/{ilsvrc12.DEVKIT_META}", meta),
        (f"{ilsvrc12.DEVKIT_DIR}/{ilsvrc12.DEVKIT_GROUND_TRUTH}", ground_truth_text.encode()),
    ])
    ground_truth = outdir / Path(ilsvrc12.DEVKIT_GROUND_TRUTH).name
    ilsvrc12.atomic_write_text(ground_truth, ground_truth_text)

    # Kaggle layout: rows in a seeded order (Kaggle's file is not sorted), boxes in pixels.
    val_solution = outdir / ilsvrc12.KAGGLE_VAL_SOLUTION
    order = np.random.default_rng([seed, 6]).permutation(len(boxes))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageId", "PredictionString"])
    for j in order:
        name, wnid, (x0, y0, x1, y1), (w, h) = boxes[j]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        writer.writerow([name.rsplit(".", 1)[0], f"{wnid} {x0} {y0} {x1} {y1} "])
    ilsvrc12.atomic_write_text(val_solution, buf.getvalue())
    synset_mapping = outdir / ilsvrc12.KAGGLE_SYNSET_MAPPING
    ilsvrc12.atomic_write_text(synset_mapping, "".join(f"{w} {words[w]}\n" for w in synsets))

    md5sums = outdir / "MD5SUMS"
    archives = [train_tar, val_tar, aux_tar, devkit_tar]
    ilsvrc12.atomic_write_text(md5sums, ilsvrc12.format_md5sums({p.name: _md5(p) for p in archives}))
    return MiniResult(
        outdir=outdir, train_tar=train_tar, val_tar=val_tar, aux_tar=aux_tar,
        devkit_tar=devkit_tar, ground_truth=ground_truth, val_solution=val_solution,
        synset_mapping=synset_mapping, md5sums=md5sums, synsets=synsets,
        train_images=len(train_entries), val_images=n_val, awkward=awkward_paths,
        seconds=time.monotonic() - start)
