"""Classifying images with a trained net: Caffe's python/caffe/classifier.py on JAX.

`Classifier(deploy prototxt, caffemodel, Preprocess)` runs the net's TEST phase on batches of
images and returns, per image, the net's first output averaged over its crops (Caffe's
Classifier.predict):
- each image is decoded and resized to `image_hw` (the mean file's size; 256x256 without one,
  as python/classify.py) exactly like convert_imageset's records (data/images.py: OpenCV, BGR,
  EXIF applied, INTER_LINEAR), so it looks like the data the net was trained on;
- pixels (0..255) are multiplied by raw_scale / 255 (classify.py's --raw_scale, 255 by
  default), the mean is subtracted, the result multiplied by input_scale;
- ten crops of the net's input size (caffe.io.oversample: the four corners and the centre,
  then their mirror images), or only the centre crop, are fed and the outputs averaged.

One difference on purpose: a full-size mean file is subtracted from the resized image BEFORE
cropping, so each crop sees the mean at its own offset (what Caffe's DataTransformer does in
training); pycaffe's Transformer cannot take a mean larger than the crop. Images are resized
with OpenCV rather than scikit-image (pycaffe), for the same reason: the training records were.

Nothing here imports the data pipeline, LMDB or Prefect: `imagenet classify` starts with JAX,
OpenCV and the net only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data import images
from data.errors import ImagenetError
from data.textlines import read_caffe_lines

# caffe.io.oversample: 4 corners + centre, each also mirrored.
OVERSAMPLE_CROPS = 10
# python/classify.py's defaults: --images_dim 256,256 and --raw_scale 255.
DEFAULT_IMAGE_HW = (256, 256)
DEFAULT_RAW_SCALE = 255.0
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class Preprocess:
    """How images become net inputs (Caffe's Transformer settings)."""

    image_hw: tuple[int, int]       # resize target
    crop_hw: tuple[int, int]        # the net's input size
    channels: int                   # 3 (BGR) or 1 (gray), from the net's input
    mean: np.ndarray | None         # (C, H, W) at image_hw, or (C, 1, 1), or None
    raw_scale: float = DEFAULT_RAW_SCALE
    input_scale: float = 1.0
    oversample: bool = True
    resize_mode: str = images.SQUASH  # as the training records were resized (data.images)

    @property
    def crops(self) -> int:
        return OVERSAMPLE_CROPS if self.oversample else 1

    def crop_offsets(self) -> list[tuple[int, int]]:
        """Top-left corners of the crops in caffe.io.oversample's order (corners row by row,
        then the centre), or the centre only. The centre is image/2 - crop/2 truncated, as
        numpy's astype(int) does in classifier.py."""
        (h, w), (ch, cw) = self.image_hw, self.crop_hw
        centre = (int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0))
        if not self.oversample:
            return [centre]
        return [(i, j) for i in (0, h - ch) for j in (0, w - cw)] + [centre]

    def check(self) -> None:
        (h, w), (ch, cw) = self.image_hw, self.crop_hw
        if ch > h or cw > w:
            raise ImagenetError(f"the net's input {ch}x{cw} is larger than the images after "
                                f"resizing ({h}x{w}); resize to at least the input size")
        if self.mean is not None and self.mean.shape[1:] not in ((1, 1), (h, w)):
            raise ImagenetError(f"mean of shape {self.mean.shape} does not fit images resized "
                                f"to {h}x{w}")
        if self.mean is not None and self.mean.shape[0] != self.channels:
            raise ImagenetError(f"mean has {self.mean.shape[0]} channels, the net's input "
                                f"{self.channels}")

    def load(self, path: str | Path) -> np.ndarray:
        """One image -> (C, H, W) float32, scaled and mean-subtracted, before cropping.
        Raises images.ImageSkip when it cannot be decoded."""
        h, w = self.image_hw
        img = images.load_image(path, gray=self.channels == 1, resize_height=h,
                                resize_width=w, resize_mode=self.resize_mode)
        x = images.to_chw(img.pixels).astype(np.float32)
        if self.raw_scale != PIXEL_MAX:
            x *= np.float32(self.raw_scale / PIXEL_MAX)
        if self.mean is not None:
            x -= self.mean
        if self.input_scale != 1.0:
            x *= np.float32(self.input_scale)
        return x

    def crops_of(self, chw: np.ndarray) -> np.ndarray:
        """(crops, C, h, w): the crops of one prepared image, mirrored ones last."""
        ch, cw = self.crop_hw
        out = np.stack([chw[:, i:i + ch, j:j + cw] for i, j in self.crop_offsets()])
        if self.oversample:
            out = np.concatenate([out, out[..., ::-1]])
        return out


def read_mean(path: str | Path | None, values: Sequence[float] | None, channels: int
              ) -> np.ndarray | None:
    """--mean (a .binaryproto, or a .npy as pycaffe's classify.py takes) or --mean_value."""
    if path and values:
        raise ImagenetError("give --mean or --mean_value, not both (Caffe's transform_param "
                            "makes them exclusive too)")
    if values:
        vals = list(values) * channels if len(values) == 1 else list(values)
        if len(vals) != channels:
            raise ImagenetError(f"--mean_value has {len(values)} values for a "
                                f"{channels}-channel input; give 1 or {channels}")
        return np.asarray(vals, np.float32).reshape(channels, 1, 1)
    if not path:
        return None
    p = Path(path)
    if p.suffix == ".npy":
        mean = np.load(p, allow_pickle=False).astype(np.float32)
    else:
        from data.datum import read_blobproto
        mean = read_blobproto(p)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise ImagenetError(f"{p}: mean of shape {mean.shape}; expected (C, H, W)")
    if mean.shape[0] != channels:
        raise ImagenetError(f"{p}: the mean has {mean.shape[0]} channels, the net's input "
                            f"{channels}; use the mean of the data this net was trained on")
    return np.ascontiguousarray(mean, np.float32)


def read_labels(path: str | Path) -> list[str]:
    """synset_words.txt and the like: line i names class i (classification.cpp)."""
    p = Path(path)
    try:
        lines = read_caffe_lines(p)
    except FileNotFoundError:
        raise ImagenetError(f"{p}: labels file not found") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


@dataclass
class Prediction:
    image: str
    scores: np.ndarray  # the net's first output averaged over the crops


class Classifier:
    """A deploy net with trained weights, run on any JAX device."""

    def __init__(self, model: str | Path, weights: str | Path, *,
                 image_hw: tuple[int, int] | None = None, mean_file: str | Path | None = None,
                 mean_values: Sequence[float] | None = None,
                 raw_scale: float = DEFAULT_RAW_SCALE, input_scale: float = 1.0,
                 oversample: bool = True, batch_images: int = 1, device=None,
                 resize_mode: str = images.SQUASH) -> None:
        import jax

        from model.caffemodel import check_coverage, copy_layers, load_caffemodel
        from model.net import Net
        from model.prototxt import read_net_parameter

        if batch_images < 1:
            raise ImagenetError(f"batch size must be >= 1 image, got {batch_images}")
        net_param = read_net_parameter(model)
        probe = Net(net_param, "TEST", source=str(model))
        if len(probe.inputs) != 1 or len(probe.inputs[0].tops) != 1:
            raise ImagenetError(f"{model}: classify needs a deploy net with one input blob "
                                f"(an Input layer or `input:`); it has "
                                f"{[t for s in probe.inputs for t in s.tops] or 'none'}")
        self.input = probe.inputs[0].tops[0]
        shape = probe.inputs[0].shapes[0]
        if len(shape) != 4:
            raise ImagenetError(f"{model}: input {self.input!r} has shape {shape}; expected "
                                "(N, C, H, W)")
        _, channels, h, w = shape
        mean = read_mean(mean_file, mean_values, int(channels))
        if mean is not None and mean.shape[1:] != (1, 1):
            image_hw = image_hw or (int(mean.shape[1]), int(mean.shape[2]))
        self.pre = Preprocess(image_hw=image_hw or DEFAULT_IMAGE_HW, crop_hw=(int(h), int(w)),
                              channels=int(channels), mean=mean, raw_scale=raw_scale,
                              input_scale=input_scale, oversample=oversample,
                              resize_mode=images.check_resize_mode(resize_mode))
        self.pre.check()
        self.batch_images = batch_images
        self.net = Net(net_param, "TEST", source=str(model), input_shapes={
            self.input: (batch_images * self.pre.crops, int(channels), int(h), int(w))})
        self.output = self.net.output_names[0]
        template = {layer.name: [None] * len(layer.blobs) for layer in self.net.layers
                    if layer.blobs}
        source = load_caffemodel(weights)
        params = copy_layers(self.net, template, [source], log=lambda m: None)
        check_coverage(self.net, [source], [weights], whole_net=True)
        self.device = device or jax.devices()[0]
        self.params = jax.device_put(params, self.device)
        self.num_outputs = math.prod(self.net.blob_shapes[self.output][1:])
        net, inp, out = self.net, self.input, self.output
        self._forward = jax.jit(lambda p, x: net.apply(p, {inp: x})[0][out])

    def predict(self, paths: Sequence[str]) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Scores for the images that decode; (path, reason) for those that do not."""
        import jax

        done: list[Prediction] = []
        skipped: list[tuple[str, str]] = []
        pending: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            crops = np.concatenate([self.pre.crops_of(x) for _, x in pending])
            full = self.batch_images * self.pre.crops
            if len(crops) < full:  # one compiled shape: pad the last batch
                crops = np.concatenate([crops, np.zeros((full - len(crops), *crops.shape[1:]),
                                                        np.float32)])
            out = np.asarray(self._forward(self.params, jax.device_put(crops, self.device)))
            out = out.reshape(self.batch_images, self.pre.crops, -1).mean(axis=1)
            done.extend(Prediction(p, out[k]) for k, (p, _) in enumerate(pending))
            pending.clear()

        for path in paths:
            try:
                pending.append((path, self.pre.load(path)))
            except images.ImageSkip as skip:
                skipped.append((path, skip.reason))
                continue
            if len(pending) == self.batch_images:
                flush()
        flush()
        return done, skipped


def top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(class index, score) of the k best, best first (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


__all__ = ["Classifier", "Prediction", "Preprocess", "read_labels", "read_mean", "top_k"]
