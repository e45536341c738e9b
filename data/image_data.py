"""The ImageData layer's input pipeline: a listing of image files -> uint8 batches.

Reproduces Caffe's ImageDataLayer (src/caffe/layers/image_data_layer.cpp):
- `source` is a listing of `<path> <int label>` lines, split at the last space (the format of
  convert_imageset's listings; data/convert.py reads both);
- each image is `root_folder + path`, decoded by convert_imageset's own path (data/images.py:
  cv::imread in colour, or grayscale when `is_color: false`, EXIF applied, then cv::resize
  INTER_LINEAR to new_height x new_width when both are set), so its pixels are exactly those of
  a convert_imageset record made with the same flags;
- `batch_size` images at a time in listing order from line `rand_skip`-draw on, wrapping to the
  first line at the end; with `shuffle` the listing is shuffled at the start and again at every
  wrap;
- then the DataTransformer, as for Data layers (crop, mirror, mean, scale: data/transform.py).

Where we differ on purpose:
- Reproducible. Caffe seeds the shuffle and the rand_skip draw from its global RNG; here
  epoch e's order and the skip come from generators keyed on (seed, stream), and crops and
  mirrors per batch index as for Data layers, so batch i is a pure function of (seed, stream, i)
  and a resumed run sees the images the uninterrupted run would have seen.
- Loud early. Caffe stops with "Could not load <file>" when it reaches a missing image, maybe
  hours in; opening the layer here checks that every listed file exists and names the missing
  ones. An image that exists but cannot be decoded stops training with its listing line.
- `image_data_param`'s own scale/mean_file/crop_size/mirror, which Caffe's ImageData layer
  ignores in new-style prototxts (only V1 `layers` are upgraded into transform_param), are
  refused instead of silently dropped.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
import numpy as np

from data import images
from data.convert import ListingEntry, read_listing, resolve_listed
from data.errors import ImagenetError
from data.pipeline import _SEED_MASK, BatchSource
from data.proto import caffe_pb2
from data.transform import TransformPlan

log = logging.getLogger(__name__)

# image_data_param fields that Caffe only honours in V1 `layers` (moved to transform_param by
# UpgradeNetDataTransformation); a new-style ImageData layer must use transform_param.
LEGACY_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
# Spawn keys of the generators beside the per-batch ones (SeedSequence spawn keys, so they
# never collide with DataSource-style [seed, stream, batch] entropy).
SKIP_KEY = 1
SHUFFLE_KEY = 2
# Missing files named in the error before "... and N more".
MISSING_SHOWN = 5


def check_param(layer_param: caffe_pb2.LayerParameter) -> caffe_pb2.ImageDataParameter:
    """ImageDataLayer::DataLayerSetUp's CHECKs, plus the refused legacy transform fields."""
    ip = layer_param.image_data_param
    name = layer_param.name
    if (ip.new_height == 0) != (ip.new_width == 0):
        raise ImagenetError(f"layer {name!r} (ImageData): new_height ({ip.new_height}) and "
                            f"new_width ({ip.new_width}) must be set together (Caffe: 'Current "
                            "implementation requires new_height and new_width to be set at "
                            "the same time')")
    if ip.batch_size < 1:
        raise ImagenetError(f"layer {name!r} (ImageData): image_data_param batch_size must be "
                            f">= 1, got {ip.batch_size}")
    if not ip.source:
        raise ImagenetError(f"layer {name!r} (ImageData): image_data_param needs a source "
                            "(a listing of '<path> <label>' lines)")
    legacy = [f for f in LEGACY_TRANSFORM_FIELDS if ip.HasField(f)]
    if legacy:
        raise ImagenetError(
            f"layer {name!r} (ImageData): image_data_param {', '.join(legacy)} is ignored by "
            "Caffe's ImageData layer (only V1 'layers' are upgraded); move it into "
            "transform_param { ... }")
    return ip


def _abs(path: str, root: str | Path) -> str:
    return path if os.path.isabs(path) else os.path.join(os.fspath(root), path)


def image_path(root_folder: str, rel: str, root: str | Path = ".") -> str:
    """The file Caffe opens for a listing line: root_folder + path (the separator added when
    the root lacks one, as convert_imageset here), relative ones against the working directory
    `root`."""
    return _abs(resolve_listed(root_folder, rel), root)


def first_image_chw(layer_param: caffe_pb2.LayerParameter, root: str | Path = "."
                    ) -> tuple[int, int, int]:
    """(C, H, W) of the listing's first image as the layer decodes it (new_height/new_width
    and is_color applied): what DataLayerSetUp infers the top shape from."""
    ip = check_param(layer_param)
    source = Path(_abs(ip.source, root))
    entries = read_listing(source)
    if not entries:
        raise ImagenetError(f"layer {layer_param.name!r}: ImageData source {source} is empty")
    first = entries[0]
    path = image_path(ip.root_folder, first.path, root)
    try:
        img = images.load_image(path, gray=not ip.is_color, resize_height=ip.new_height,
                                resize_width=ip.new_width)
    except images.ImageSkip as skip:
        raise ImagenetError(f"{source}:{first.line_no}: cannot load {path}: {skip.reason}"
                            ) from None
    c, h, w = images.to_chw(img.pixels).shape
    return int(c), int(h), int(w)


class ImageDataSource(BatchSource):
    """An ImageData layer's listing and transform; `batch(i)` is pure in (seed, stream, i)."""

    def __init__(self, layer_param: caffe_pb2.LayerParameter, *, train: bool, seed: int,
                 stream: int = 0, batch_multiplier: int = 1, root: str | Path = ".") -> None:
        ip = check_param(layer_param)
        self.name = layer_param.name
        self.path = Path(_abs(ip.source, root))
        self.root_folder = ip.root_folder
        self.root = os.fspath(root)
        self.entries: list[ListingEntry] = read_listing(self.path)
        if not self.entries:
            raise ImagenetError(f"layer {self.name!r}: ImageData source {self.path} is empty "
                                "(Caffe: 'File is empty')")
        self._check_files_exist()
        self.new_hw = (int(ip.new_height), int(ip.new_width))
        self.gray = not ip.is_color
        self.shuffle = bool(ip.shuffle)
        self.plan = TransformPlan.from_param(layer_param.transform_param, train=train, root=root)
        # As for Data layers: each of the devices' solvers reads batch_size images.
        self.batch_size = int(ip.batch_size) * int(batch_multiplier)
        self.seed = int(seed) & _SEED_MASK
        self.stream = int(stream)
        self.tops = tuple(layer_param.top)
        self.skip = 0
        if ip.rand_skip:
            # image_data_layer.cpp: skip = caffe_rng_rand() % rand_skip, fatal if >= lines.
            self.skip = int(self._generator(SKIP_KEY).integers(0, ip.rand_skip))
            if self.skip >= len(self.entries):
                raise ImagenetError(
                    f"layer {self.name!r}: rand_skip drew {self.skip}, but {self.path} lists "
                    f"only {len(self.entries)} images (Caffe: 'Not enough points to skip'); "
                    "lower rand_skip")
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _check_files_exist(self) -> None:
        missing = [e for e in self.entries
                   if not os.path.isfile(self.file(e))]
        if missing:
            shown = ", ".join(f"line {e.line_no} {e.path!r}" for e in missing[:MISSING_SHOWN])
            more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            raise ImagenetError(
                f"{self.path}: {len(missing)} of {len(self.entries)} listed images not found "
                f"under root_folder {self.root_folder!r}: {shown}{more}. Fix the listing or "
                "root_folder (Caffe would stop at the first with 'Could not load')")

    def __len__(self) -> int:
        return len(self.entries)

    def file(self, entry: ListingEntry) -> str:
        """The image file of one listing entry."""
        return image_path(self.root_folder, entry.path, self.root)

    def _generator(self, purpose: int, *extra: int) -> np.random.Generator:
        seq = np.random.SeedSequence([self.seed, self.stream], spawn_key=(purpose, *extra))
        return np.random.Generator(np.random.Philox(seq))

    def order(self, epoch: int) -> np.ndarray:
        """Listing indices in the order epoch `epoch` reads them: the listing's own order, or
        with shuffle a permutation per epoch (Caffe shuffles at setup and at every wrap)."""
        if not self.shuffle:
            return np.arange(len(self.entries))
        with self._lock:
            perm = self._orders.get(epoch)
            if perm is None:
                perm = self._generator(SHUFFLE_KEY, epoch).permutation(len(self.entries))
                # Batches are read near each other in epoch order: keep the last two epochs.
                self._orders = {e: p for e, p in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = perm
            return perm

    def entry_indices(self, index: int) -> list[int]:
        """Listing indices of batch `index`: positions skip + index*N ... run through epochs."""
        n = len(self.entries)
        start = self.skip + index * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, k = divmod(pos, n)
            out.append(int(self.order(epoch)[k]))
        return out

    def wrapped(self, index: int, offset: int = 0) -> bool:
        return super().wrapped(index, offset=self.skip)

    def load(self, entry: ListingEntry) -> np.ndarray:
        """One listed image, (C, H, W) uint8 BGR (or gray), as convert_imageset decodes it."""
        path = self.file(entry)
        try:
            img = images.load_image(path, gray=self.gray, resize_height=self.new_hw[0],
                                    resize_width=self.new_hw[1])
        except images.ImageSkip as skip:
            raise ImagenetError(f"{self.path}:{entry.line_no}: cannot load {path}: "
                                f"{skip.reason}; fix or remove that line") from None
        if img.truncated:
            log.warning("%s:%d: truncated JPEG %s: read with the missing rows gray (128), as "
                        "Caffe does", self.path, entry.line_no, path)
        return images.to_chw(img.pixels)

    def _items(self, index: int) -> tuple[list[np.ndarray], list[int], str]:
        imgs, labels = [], []
        for i in self.entry_indices(index)[self.rows()]:
            entry = self.entries[i]
            chw = self.load(entry)
            self.plan.check_image(chw.shape, f"{self.path}:{entry.line_no} ({entry.path})")
            imgs.append(chw)
            labels.append(entry.label)
        return imgs, labels, str(self.path)

    def describe_item(self, index: int, j: int) -> str:
        entry = self.entries[int(self.entry_indices(index)[j])]
        return f"{self.path}:{entry.line_no} ({entry.path})"

    def close(self) -> None:
        """Nothing to release: images are opened per read."""


__all__ = ["ImageDataSource", "check_param", "first_image_chw", "image_path"]
