"""Caffe layer types on JAX: importing this package fills the registry.

`layer_class("Convolution")` returns the class for a Caffe type string (unknown types fail
listing the supported ones); `REGISTRY` maps every supported type string to its class.
Conventions the Net relies on are documented in base.py (the interface), data.py (input-layer
shapes and fed tops) and normalization.py (BatchNorm statistics blobs and their updates).
"""
from __future__ import annotations

from model.layers import activation, common, data, loss, normalization, vision  # noqa: F401  (registers)
from model.layers.base import REGISTRY, BlobSpec, Layer, Shape, layer_class, register

__all__ = ["REGISTRY", "BlobSpec", "Layer", "Shape", "layer_class", "register"]
