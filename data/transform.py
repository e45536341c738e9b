"""Caffe's DataTransformer (src/caffe/data_transformer.cpp) for Datum batches.

Split in two so uint8 pixels travel to the device and the float work runs there:
- host (`TransformPlan.draw`, `crop_uint8`): per image, the crop offset (TRAIN:
  rand(H - crop + 1), TEST: (H - crop) / 2) and the mirror flag (p = 1/2, only when
  `mirror: true`, in either phase as in Caffe), then the uint8 crop;
- device (`transform_batch`, jittable): out = (x - mean[at the same offset]) * scale, then the
  width axis flipped for mirrored images. Caffe subtracts the mean at the SOURCE pixel and writes
  the result to the mirrored position, which is exactly "subtract the cropped mean, then flip".

`reference_transform` is a plain float64 numpy rendering of Caffe's loop, for the tests.
Random draws come from the caller (data/pipeline.py keys them on seed, iteration and image), so
a batch is a pure function of its inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.errors import ImagenetError
from data.proto import caffe_pb2


# Uniforms drawn per image: mirror, h_off, w_off (data_transformer.cpp draws the same three).
DRAWS_PER_IMAGE = 3
# Caffe mirrors when Rand(2) == 1: probability one half.
MIRROR_P = 0.5


@dataclass(frozen=True)
class TransformPlan:
    """transform_param made concrete: crop size, mirror, mean (full-size array or per-channel
    values), scale, and the phase that decides random vs centre crops."""

    crop_size: int
    mirror: bool
    scale: float
    train: bool
    mean_file: np.ndarray | None  # (C, H, W) float32, BlobProto order
    mean_values: tuple[float, ...]
    force_color: bool
    force_gray: bool
    mean_path: str = ""  # where mean_file came from, for messages

    @classmethod
    def from_param(cls, tp: caffe_pb2.TransformationParameter, *, train: bool,
                   root: str | Path = ".") -> "TransformPlan":
        """Caffe's DataTransformer constructor: mean_file and mean_value are exclusive; the
        mean file is resolved against `root` (Caffe: the working directory)."""
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise ImagenetError(
                f"transform_param: cannot specify mean_file ({tp.mean_file!r}) and mean_value "
                f"({list(tp.mean_value)}) at the same time")
        if tp.force_color and tp.force_gray:
            raise ImagenetError("transform_param: force_color and force_gray are exclusive")
        mean, path = None, None
        if tp.HasField("mean_file"):
            path = Path(root) / tp.mean_file
            if not path.exists():
                raise ImagenetError(f"transform_param mean_file {tp.mean_file!r} not found "
                                    f"(looked at {path})")
            from data.datum import read_blobproto
            mean = np.asarray(read_blobproto(path), dtype=np.float32)
            if mean.ndim == 4:
                if mean.shape[0] != 1:
                    raise ImagenetError(f"mean_file {path} holds {mean.shape[0]} images, "
                                        "Caffe needs num = 1")
                mean = mean[0]
            if mean.ndim != 3:
                raise ImagenetError(f"mean_file {path} has shape {mean.shape}, expected "
                                    "(1, C, H, W) or (C, H, W)")
        return cls(crop_size=int(tp.crop_size), mirror=bool(tp.mirror), scale=float(tp.scale),
                   train=train, mean_file=mean, mean_values=tuple(float(v) for v in tp.mean_value),
                   force_color=bool(tp.force_color), force_gray=bool(tp.force_gray),
                   mean_path=str(path) if mean is not None else "")

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return (self.crop_size, self.crop_size) if self.crop_size else (h, w)

    def check_image(self, chw_shape: Sequence[int], where: str) -> None:
        """Caffe's CHECKs for one image: crop fits, mean file matches, mean_value count."""
        c, h, w = (int(x) for x in chw_shape)
        if self.crop_size and (h < self.crop_size or w < self.crop_size):
            raise ImagenetError(f"{where}: image {h}x{w} is smaller than crop_size "
                                f"{self.crop_size}")
        if self.mean_file is not None and tuple(self.mean_file.shape) != (c, h, w):
            raise ImagenetError(f"{where}: image shape {(c, h, w)} differs from the shape "
                                f"{tuple(self.mean_file.shape)} of mean_file {self.mean_path}; "
                                "compute the mean of this database (compute-image-mean)")
        if self.mean_values and len(self.mean_values) not in (1, c):
            raise ImagenetError(f"{where}: {len(self.mean_values)} mean_value entries for "
                                f"{c} channels (Caffe wants 1 or one per channel)")

    def draw(self, rng: np.random.Generator, heights: Sequence[int], widths: Sequence[int],
             *, batch: int | None = None, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (h_off, w_off) int32 (n, 2) and mirror flags bool (n,) for the n =
        len(heights) images first .. first+n-1 of a batch of `batch` (default n) images.

        Every image of the batch gets DRAWS_PER_IMAGE uniforms from `rng` whatever its size,
        so the draws of one image do not depend on the others': a process reading only its
        share of a global batch draws exactly what one process reading all of it would.
        Caffe's Rand(n) (a 32-bit draw mod n) becomes floor(u * n): mirror = Rand(2),
        h_off = Rand(H - crop + 1), w_off = Rand(W - crop + 1) in TRAIN; TEST crops the
        centre, (H - crop) / 2."""
        n = len(heights)
        total = n if batch is None else int(batch)
        if not 0 <= first <= total - n:
            raise ImagenetError(f"images {first}..{first + n - 1} are not in a batch of {total}")
        u = rng.random((total, DRAWS_PER_IMAGE))[first:first + n]
        hs, ws = np.asarray(heights), np.asarray(widths)
        flips = (u[:, 0] < MIRROR_P) if self.mirror else np.zeros(n, bool)
        if not self.crop_size:
            offs = np.zeros((n, 2), np.int32)
        elif self.train:
            offs = np.floor(u[:, 1:] * np.stack([hs - self.crop_size + 1,
                                                 ws - self.crop_size + 1], axis=1))
            offs = offs.astype(np.int32)
        else:
            offs = np.stack([(hs - self.crop_size) // 2,
                             (ws - self.crop_size) // 2], axis=1).astype(np.int32)
        return offs, flips

    def mean_array(self, channels: int) -> np.ndarray | None:
        """The mean the device subtracts: full (C,H,W) from mean_file, (C,1,1) from mean_value,
        or None."""
        if self.mean_file is not None:
            return self.mean_file
        if self.mean_values:
            vals = self.mean_values * channels if len(self.mean_values) == 1 else self.mean_values
            return np.asarray(vals, np.float32).reshape(channels, 1, 1)
        return None


def crop_uint8(chw: np.ndarray, offset: Sequence[int], out_hw: tuple[int, int]) -> np.ndarray:
    """The uint8 window of one image (a view: no float work on the host)."""
    h0, w0 = int(offset[0]), int(offset[1])
    return chw[:, h0:h0 + out_hw[0], w0:w0 + out_hw[1]]


def transform_batch(images: jax.Array, offsets: jax.Array, mirror: jax.Array,
                    mean: jax.Array | None, scale: float) -> jax.Array:
    """Device side of DataTransformer::Transform for a batch of already-cropped uint8 images.

    images (N, C, h, w) uint8; offsets (N, 2) int32 where each crop started in the source image;
    mirror (N,) bool; mean None, (C, 1, 1) per-channel values, or (C, H, W) full-size mean (then
    cropped at each image's offset). Returns float32 (N, C, h, w):
    out = flip_w((x - mean_crop) * scale) where flipped.
    """
    x = images.astype(jnp.float32)
    n, c, h, w = x.shape
    if mean is not None:
        mean = jnp.asarray(mean, jnp.float32)
        if mean.shape[1:] == (1, 1):
            x = x - mean[None]
        else:
            def crop_mean(off: jax.Array) -> jax.Array:
                return jax.lax.dynamic_slice(mean, (0, off[0], off[1]), (c, h, w))
            x = x - jax.vmap(crop_mean)(offsets)
    if scale != 1.0:
        x = x * jnp.float32(scale)
    return jnp.where(mirror[:, None, None, None], x[..., ::-1], x)


def reference_transform(chw: np.ndarray, offset: Sequence[int], mirror: bool,
                        plan: TransformPlan) -> np.ndarray:
    """Caffe's Transform(const Datum&, Dtype*) loop, literally, in float64 (tests only)."""
    c, hh, ww = chw.shape
    oh, ow = plan.output_hw(hh, ww)
    h_off, w_off = int(offset[0]), int(offset[1])
    mean = plan.mean_array(c)
    out = np.zeros((c, oh, ow), np.float64)
    for ch in range(c):
        for h in range(oh):
            for w in range(ow):
                tw = ow - 1 - w if mirror else w
                x = float(chw[ch, h_off + h, w_off + w])
                if mean is not None:
                    if mean.shape[1:] == (1, 1):
                        x -= float(mean[ch, 0, 0])
                    else:
                        x -= float(mean[ch, h_off + h, w_off + w])
                out[ch, h, tw] = x * plan.scale
    return out
