"""The layer interface every Caffe layer type implements, and the registry keyed by type string.

A layer is built once from its LayerParameter and the shapes of its bottoms (Caffe's
LayerSetUp + Reshape): it reports its top shapes and the shapes and fillers of its blobs
(learnable or stored, in Caffe's layout, e.g. convolution weights (num_output, C/group, kh, kw)).
`forward` is then a pure, jittable function of (blobs, bottoms, rng, train) -> tops; gradients
come from JAX. Internally a layer may use whatever layout is fastest; Caffe's layout is the
interface (blobs in Caffe shapes, blobs/tops NCHW).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import jax

from data.errors import ImagenetError
from data.labels import LabelCheck
from data.proto import caffe_pb2

Shape = tuple[int, ...]


@dataclass
class BlobSpec:
    """One blob a layer owns: its Caffe shape and how to initialise it."""

    shape: Shape
    filler: caffe_pb2.FillerParameter | None = None  # None: zeros (e.g. BatchNorm statistics)
    learnable: bool = True  # False for blobs Caffe updates in forward (BatchNorm statistics)


class Layer:
    """Base class: subclasses set `type_name`, implement `setup` and `forward`.

    After `setup`, `top_shapes` and `blobs` are filled in. `loss_weights` defaults to 1 for
    the first top of loss layers (`is_loss = True`) and 0 elsewhere, overridden by the
    prototxt's `loss_weight`.
    """

    type_name: ClassVar[str] = ""
    is_loss: ClassVar[bool] = False
    # Data-producing layers (Data, Input, DummyData) take no bottoms; their tops come from the
    # batch fed to Net.apply (Data, Input) or are generated (DummyData).
    is_input: ClassVar[bool] = False

    def __init__(
        self,
        param: caffe_pb2.LayerParameter,
        bottom_shapes: Sequence[Shape],
        *,
        given_top_shapes: Sequence[Shape] | None = None,
    ) -> None:
        self.param = param
        self.name = param.name
        self.bottom_shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        # Input layers (Data, Input) whose top shapes the Net knows from elsewhere (the first
        # record of a Data layer's LMDB plus crop/batch size, or a caller's override) receive
        # them here; their setup() uses them instead of (or to check) the prototxt.
        self.given_top_shapes = (
            None if given_top_shapes is None
            else [tuple(int(d) for d in s) for s in given_top_shapes]
        )
        self.top_shapes: list[Shape] = []
        self.blobs: list[BlobSpec] = []
        self.setup()
        n_top = len(param.top)
        if len(self.top_shapes) != n_top:
            raise ImagenetError(
                f"layer {self.name!r} ({self.type_name}) produces {len(self.top_shapes)} tops "
                f"but the prototxt names {n_top}"
            )

    # -- to implement -------------------------------------------------------------------
    def setup(self) -> None:
        """Check the parameters, fill self.top_shapes and self.blobs."""
        raise NotImplementedError

    def forward(
        self,
        blobs: Sequence[jax.Array],
        bottoms: Sequence[jax.Array],
        *,
        rng: jax.Array | None,
        train: bool,
    ) -> list[jax.Array]:
        """Pure function: tops from blobs and bottoms. Must be jittable."""
        raise NotImplementedError

    def updated_blobs(
        self,
        blobs: Sequence[jax.Array],
        bottoms: Sequence[jax.Array],
        *,
        train: bool,
    ) -> list[jax.Array] | None:
        """For layers whose non-learnable blobs change in a TRAIN forward (BatchNorm's
        running statistics): the new values of all blobs, else None."""
        return None

    def label_checks(self) -> dict[int, LabelCheck]:
        """Bottom index -> the labels this layer accepts there, for layers that read a bottom
        as class indices (the input pipeline checks every batch against it: data/labels.py)."""
        return {}

    # -- helpers ------------------------------------------------------------------------
    @property
    def loss_weights(self) -> list[float]:
        given = list(self.param.loss_weight)
        if given:
            return given + [0.0] * (len(self.top_shapes) - len(given))
        return [1.0 if (self.is_loss and i == 0) else 0.0 for i in range(len(self.top_shapes))]

    def fail(self, message: str) -> ImagenetError:
        """An error naming this layer; `raise self.fail("...")`."""
        return ImagenetError(f"layer {self.name!r} ({self.type_name}): {message}")


REGISTRY: dict[str, type[Layer]] = {}


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make a layer type available under its Caffe type string."""
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type_name")
    REGISTRY[cls.type_name] = cls
    return cls


def layer_class(type_name: str, layer_name: str = "") -> type[Layer]:
    """The class for a Caffe type string; unknown types fail listing the supported ones."""
    try:
        return REGISTRY[type_name]
    except KeyError:
        where = f"layer {layer_name!r}: " if layer_name else ""
        raise ImagenetError(
            f"{where}unknown layer type {type_name!r}; supported: {', '.join(sorted(REGISTRY))}"
        ) from None


__all__ = ["BlobSpec", "Layer", "REGISTRY", "register", "layer_class", "Shape"]
