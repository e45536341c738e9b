"""Data-producing layers: Data, ImageData, Input, DummyData (no bottoms; they start the net).

Convention with the Net (model/net.py) for the layers whose tops are FED (``feeds_from_batch``):

* Shapes. ``Data`` cannot know its shapes from the prototxt alone (they depend on the LMDB's
  records; ``ImageData``'s on the listing's first image), so the Net passes them:
  ``Data(param, [], given_top_shapes=[(N, C, H, W), (N,)])``.
  ``Data.top_shapes_for(param, datum_shape=(C, H, W))`` computes them the way Caffe's
  DataLayer::DataLayerSetUp does (batch_size from data_param, crop from transform_param; the
  label top, when named, is (N,)). ``Input`` reads ``input_param.shape`` (one shape for all tops
  or one per top, Caffe's InputLayer); ``given_top_shapes``, when passed, overrides it (e.g. a
  deploy net run at another batch size). Either layer fails loudly when it has no shapes.
* Forward. The Net calls ``layer.forward([], fed, rng=..., train=...)`` where ``fed`` are the
  arrays of the batch in the order of the layer's tops; the layer returns them unchanged
  (checking count and shapes at trace time). The data transform (crop, mirror, mean, scale)
  happens in the input pipeline, never here.

``DummyData`` is not fed (``feeds_from_batch = False``): its forward generates its tops from
``data_filler`` (constant 0 by default; gaussian and uniform are redrawn each forward from
``rng``, as Caffe refills non-constant fillers every Forward: dummy_data_layer.cpp).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.layers.base import Layer, Shape, register


class _FedLayer(Layer):
    """A layer whose tops are the arrays fed to Net.apply."""

    is_input = True
    feeds_from_batch: ClassVar[bool] = True

    def forward(self, blobs, bottoms, *, rng, train):
        fed = list(bottoms)
        if len(fed) != len(self.top_shapes):
            raise self.fail(
                f"fed {len(fed)} arrays for {len(self.top_shapes)} tops {list(self.param.top)}"
            )
        for name, arr, want in zip(self.param.top, fed, self.top_shapes):
            if tuple(arr.shape) != tuple(want):
                raise self.fail(f"top {name!r} fed with shape {tuple(arr.shape)}, expected {want}")
        return fed


# Caffe: src/caffe/layers/data_layer.cpp (DataLayerSetUp) + base_data_layer.cpp.
@register
class Data(_FedLayer):
    """LMDB/LevelDB reader: tops `data` (N, C, crop|H, crop|W) and optionally `label` (N,)."""

    type_name = "Data"
    batch_param_name: ClassVar[str] = "data_param"

    @staticmethod
    def batch_size_of(param: caffe_pb2.LayerParameter) -> int:
        return int(param.data_param.batch_size)

    @classmethod
    def top_shapes_for(cls, param: caffe_pb2.LayerParameter, datum_shape: Shape) -> list[Shape]:
        """Caffe's top shapes from the first record's (C, H, W), batch_size and crop_size."""
        c, h, w = (int(d) for d in datum_shape)
        batch = cls.batch_size_of(param)
        crop = int(param.transform_param.crop_size)
        if crop:
            if crop > h or crop > w:
                raise ImagenetError(
                    f"layer {param.name!r} ({cls.type_name}): crop_size {crop} is larger "
                    f"than the records ({c}x{h}x{w})"
                )
            h = w = crop
        shapes: list[Shape] = [(batch, c, h, w)]
        if len(param.top) > 1:
            shapes.append((batch,))
        return shapes

    def setup(self) -> None:
        if self.bottom_shapes:
            raise self.fail(f"takes no bottoms, got {len(self.bottom_shapes)}")
        if not 1 <= len(self.param.top) <= 2:
            raise self.fail(f"needs 1 or 2 tops (data[, label]), got {list(self.param.top)}")
        if self.batch_size_of(self.param) <= 0:
            raise self.fail(f"{self.batch_param_name}.batch_size must be set and positive")
        if self.given_top_shapes is None:
            raise self.fail(
                "its top shapes come from the database: the Net must pass "
                "given_top_shapes (see Data.top_shapes_for)"
            )
        shapes = self.given_top_shapes
        if len(shapes) != len(self.param.top):
            raise self.fail(f"given {len(shapes)} top shapes for tops {list(self.param.top)}")
        if len(shapes[0]) != 4:
            raise self.fail(f"data top must be 4-D (N, C, H, W), given {shapes[0]}")
        if len(shapes) == 2 and shapes[1] != (shapes[0][0],):
            raise self.fail(f"label shape {shapes[1]} does not match batch {shapes[0][0]}")
        self.top_shapes = list(shapes)


# Caffe: src/caffe/layers/image_data_layer.cpp (DataLayerSetUp).
@register
class ImageData(Data):
    """Image-listing reader: tops `data` (N, C, crop|H, crop|W) and `label` (N,), shapes from
    the listing's first image (data/image_data.py reads and decodes the images)."""

    type_name = "ImageData"
    batch_param_name: ClassVar[str] = "image_data_param"

    @staticmethod
    def batch_size_of(param: caffe_pb2.LayerParameter) -> int:
        return int(param.image_data_param.batch_size)


# Caffe: src/caffe/layers/input_layer.cpp.
@register
class Input(_FedLayer):
    """Tops of fixed shapes fed by the caller (deploy nets)."""

    type_name = "Input"

    def setup(self) -> None:
        if self.bottom_shapes:
            raise self.fail(f"takes no bottoms, got {len(self.bottom_shapes)}")
        n_top = len(self.param.top)
        if self.given_top_shapes is not None:
            if len(self.given_top_shapes) != n_top:
                raise self.fail(
                    f"given {len(self.given_top_shapes)} top shapes for tops {list(self.param.top)}"
                )
            self.top_shapes = list(self.given_top_shapes)
            return
        shapes = [tuple(int(d) for d in s.dim) for s in self.param.input_param.shape]
        # input_layer.cpp: "Must specify 'shape' once, once per top blob, or not at all".
        if len(shapes) == 1:
            shapes = shapes * n_top
        if len(shapes) != n_top:
            raise self.fail(
                f"input_param has {len(shapes)} shapes for {n_top} tops "
                f"{list(self.param.top)}; give one shape, or one per top"
            )
        if not shapes and n_top:
            raise self.fail("no input_param.shape and no shapes given by the Net")
        for s in shapes:
            if any(d <= 0 for d in s):
                raise self.fail(f"input shape {s} has a non-positive dimension")
        self.top_shapes = shapes


def _fill(filler: caffe_pb2.FillerParameter, shape: Shape, rng: jax.Array | None, who: Layer):
    """One DummyData top from its filler (filler.hpp semantics for the data-free fillers)."""
    kind = filler.type
    if kind == "constant":
        return jnp.full(shape, filler.value, jnp.float32)
    if rng is None:
        raise who.fail(f"data_filler {kind!r} needs an rng")
    if kind == "uniform":
        return jax.random.uniform(rng, shape, jnp.float32, filler.min, filler.max)
    if kind == "gaussian":
        return filler.mean + filler.std * jax.random.normal(rng, shape, jnp.float32)
    raise who.fail(f"data_filler type {kind!r} not supported here; use one of constant, gaussian, uniform")


_DUMMY_FILLERS = ("constant", "gaussian", "uniform")


# Caffe: src/caffe/layers/dummy_data_layer.cpp.
@register
class DummyData(Layer):
    """Tops generated from fillers, for tests and benchmarks."""

    type_name = "DummyData"
    is_input = True
    feeds_from_batch: ClassVar[bool] = False

    def setup(self) -> None:
        p = self.param.dummy_data_param
        n_top = len(self.param.top)
        if self.bottom_shapes:
            raise self.fail(f"takes no bottoms, got {len(self.bottom_shapes)}")
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if p.shape and any(legacy):
            raise self.fail("use either shape or num/channels/height/width, not both")
        if p.shape:
            shapes = [tuple(int(d) for d in s.dim) for s in p.shape]
        else:
            for name, vals in zip(("num", "channels", "height", "width"), legacy):
                if len(vals) not in (1, n_top):
                    raise self.fail(f"{name} has {len(vals)} values; give 1 or {n_top} (one per top)")
            shapes = [
                tuple(vals[i] if len(vals) > 1 else vals[0] for vals in legacy)
                for i in range(n_top)
            ]
        if len(shapes) == 1:
            shapes = shapes * n_top
        if len(shapes) != n_top:
            raise self.fail(f"{len(shapes)} shapes for {n_top} tops; give 1 or one per top")
        fillers = list(p.data_filler)
        if not fillers:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        if len(fillers) == 1:
            fillers = fillers * n_top
        if len(fillers) != n_top:
            raise self.fail(f"{len(p.data_filler)} data_fillers for {n_top} tops; give 0, 1 or one per top")
        for f in fillers:
            if f.type not in _DUMMY_FILLERS:
                raise self.fail(
                    f"data_filler type {f.type!r} not supported; supported: {', '.join(_DUMMY_FILLERS)}"
                )
        self.fillers = fillers
        self.top_shapes = shapes

    def forward(self, blobs, bottoms, *, rng, train):
        keys = [None] * len(self.top_shapes)
        if rng is not None:
            keys = list(jax.random.split(rng, len(self.top_shapes)))
        return [_fill(f, s, k, self) for f, s, k in zip(self.fillers, self.top_shapes, keys)]


__all__ = ["Data", "ImageData", "Input", "DummyData"]
