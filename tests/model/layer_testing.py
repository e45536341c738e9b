"""Helpers of the per-layer tests (tests/model/test_layers_*.py): build one layer from its
prototxt text, compare float32 results with float64 references, draw random inputs.
Importable as `layer_testing` (pyproject.toml puts tests/model on pytest's pythonpath)."""
from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from data.proto import caffe_pb2
from model.layers import layer_class

# Tolerances: float32 results vs float64 references, max |error| relative to max |ref|.
# Measured on CPU (2026-11-27): <= 2e-7 for forwards, <= 5e-7 for gradients; the bounds
# (2e-6 forward, 1e-5 for gradients that sum many products) leave room for other backends
# (all pass on an H100 with jax 0.11.2).
RTOL = 2e-6


def make(text: str, *bottom_shapes):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.top:
        lp.top.append("out")
    return layer_class(lp.type, lp.name)(lp, list(bottom_shapes))


def close(got, ref, rtol=RTOL) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err < rtol, f"relative max error {err:.3g} >= {rtol}"
    return err


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
