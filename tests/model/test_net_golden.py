"""model/net.py against real Caffe (../shared/caffe-golden, README sections 5, 8, 11):
layer lists and top shapes, TEST-phase forward of every layer, parameter and bottom gradients.

Tolerances are the README's: rtol 1e-4 plus atol 1e-5 x max|value| per blob (Caffe convolves by
im2col + OpenBLAS sgemm in float32, XLA sums in another order); loss and accuracies to 1e-5.
Measured worst error, max|ours - caffe| / max|caffe| per blob (2026-11-28, CPU kernels with
col2im input gradients): forward blobs <= 6.5e-7 (relu3), bottom gradients <= 5.2e-7, parameter
gradients <= 1.3e-6 (conv1's weights, a sum over 32 x 3025 positions; 7.8e-7 before the col2im
input gradients changed the summation order upstream of it).
"""
from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import pytest

from data.errors import ImagenetError
from model import autotune, kernels
from model.caffemodel import copy_layers, load_caffemodel
from model.net import Net

RTOL = 1e-4
ATOL_FRACTION = 1e-5  # of max|value| of the Caffe blob
SCALAR_ATOL = 1e-5
SCALARS = ("loss", "accuracy", "accuracy_top5")
DATA_TOPS = ("data", "label")


def assert_blob_close(name: str, got, ref) -> None:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != Caffe's {ref.shape}"
    if name in SCALARS:
        np.testing.assert_allclose(got, ref, rtol=0, atol=SCALAR_ATOL, err_msg=name)
        return
    atol = ATOL_FRACTION * float(np.max(np.abs(ref)))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def test_net(golden):
    # Caffe resolves Data sources (and mean files) against the working directory.
    with contextlib.chdir(golden):
        net = Net.from_prototxt("net.prototxt", "TEST")
    return net


@pytest.fixture(scope="module")
def golden_params(test_net, golden):
    weights = load_caffemodel(golden / "alexmini_iter_10.caffemodel")
    return copy_layers(test_net, test_net.init(jax.random.PRNGKey(0)), [weights],
                       log=lambda _: None)


@pytest.fixture(scope="module")
def golden_batch(golden):
    blobs = np.load(golden / "forward_blobs.npz")
    return {k: blobs[k] for k in DATA_TOPS}


@pytest.fixture(scope="module")
def golden_run(test_net, golden_params, golden_batch):
    """Per-layer outputs and all gradients in ONE jitted program (one XLA compile: the
    forward is shared, which halves this module's time on the 2-core machine)."""

    def run(p, b):
        return test_net.layer_outputs(p, b, None, False), test_net.gradients(p, b, None, False)

    return jax.jit(run)(golden_params, golden_batch)


def test_test_net_layers_and_shapes_match_caffe(test_net, golden):
    blobs = np.load(golden / "forward_blobs.npz")
    keys = [k for k in blobs.files if k not in DATA_TOPS]
    assert [layer.name for layer in test_net.layers] == ["data"] + keys
    data_layer = test_net.layers[0]
    assert [tuple(s) for s in data_layer.top_shapes] == [blobs["data"].shape,
                                                         blobs["label"].shape]
    for key in keys:
        assert tuple(test_net.layer(key).top_shapes[0]) == blobs[key].shape, key
    assert test_net.output_names == ["loss", "accuracy", "accuracy_top5"]
    [spec] = test_net.inputs
    assert (spec.layer_name, spec.type, spec.tops) == ("data", "Data", DATA_TOPS)


def test_learnable_params_in_caffe_order(test_net, golden):
    state = json.loads((golden / "alexmini_iter_10.solverstate.json").read_text())
    keys = [f"{p.layer}/{p.index}" for p in test_net.learnable_params]
    assert keys == state["history_param_keys"]
    assert [list(p.shape) for p in test_net.learnable_params] == state["history_shapes"]
    assert [(p.lr_mult, p.decay_mult) for p in test_net.learnable_params[:2]] == [(1, 1), (2, 0)]


def test_deterministic_net_shapes(golden):
    with contextlib.chdir(golden):
        net = Net.from_prototxt("net_deterministic.prototxt", "TRAIN")
    names = [layer.name for layer in net.layers]
    assert "drop6" not in names and "accuracy" not in names
    # Full 64x64 input: pool5 rounds 6 -> 3 with Caffe's ceil (floor would give 2).
    expected = {"data": (8, 3, 64, 64), "label": (8,), "conv1": (8, 16, 27, 27),
                "pool1": (8, 16, 13, 13), "pool2": (8, 32, 6, 6), "pool5": (8, 32, 3, 3),
                "fc6": (8, 64), "fc8": (8, 10), "loss": ()}
    for blob, shape in expected.items():
        assert net.blob_shapes[blob] == shape, blob


def test_finetune_net_renames_fc8(golden):
    with contextlib.chdir(golden):
        net = Net.from_prototxt("net_finetune.prototxt", "TRAIN")
    assert "fc8_ft" in [layer.name for layer in net.layers]
    assert "fc8" not in net.blob_shapes and net.blob_shapes["fc8_ft"] == (8, 10)
    assert [p.layer for p in net.learnable_params][-2:] == ["fc8_ft", "fc8_ft"]


def test_input_shapes_replace_the_database(golden, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no LMDB here
    with pytest.raises(ImagenetError, match="val_64_lmdb"):
        Net.from_prototxt(golden / "net.prototxt", "TEST")
    net = Net.from_prototxt(golden / "net.prototxt", "TEST", input_shapes={"data": (2, 3, 57, 57)})
    assert net.blob_shapes["label"] == (2,) and net.blob_shapes["fc8"] == (2, 10)


def test_forward_matches_caffe_layer_by_layer(test_net, golden_params, golden_batch, golden_run,
                                              golden):
    blobs = np.load(golden / "forward_blobs.npz")
    (outputs, loss), _ = golden_run
    np.testing.assert_array_equal(np.asarray(outputs["data"][0]), blobs["data"])
    for key in blobs.files:
        if key in DATA_TOPS:
            continue
        assert_blob_close(key, outputs[key][0], blobs[key])
    assert float(loss) == pytest.approx(float(blobs["loss"]), abs=SCALAR_ATOL)
    # apply() returns the net outputs (traced only: eager would cost ~20 s here).
    tops, loss2 = jax.eval_shape(lambda p, b: test_net.apply(p, b), golden_params, golden_batch)
    assert sorted(tops) == sorted(SCALARS) and loss2.shape == ()


def test_backward_matches_caffe(golden_run, golden):
    param_grads = np.load(golden / "param_grads.npz")
    blob_grads = np.load(golden / "blob_grads.npz")
    _, (loss, grads, diffs) = golden_run
    assert float(loss) == pytest.approx(float(np.load(golden / "forward_blobs.npz")["loss"]),
                                        abs=SCALAR_ATOL)
    for key in param_grads.files:
        layer, index = key.split("/")
        assert_blob_close(key, grads[layer][int(index)], param_grads[key])
    for key in blob_grads.files:
        assert_blob_close(key, diffs[key], blob_grads[key])


def test_winograd_plans_match_caffe(test_net, golden_params, golden_batch, golden, monkeypatch):
    """conv3-5 (3x3, pad 1, two of them grouped) computed by Winograd F(2x2, 3x3) in all three
    passes, the other layers as always: the same blobs and gradients as Caffe's within the same
    tolerances. Measured worst error, max|ours - caffe| / max|caffe| over every forward blob,
    parameter gradient and bottom gradient (2026-12-01): 6.3e-7 (conv3's output), within the
    direct plans' own (see the module docstring)."""
    winograd = []

    def plan(x_shape, w_shape, stride, pad, dilation, groups, dtype):
        if kernels.winograd_applies(w_shape[2:], stride, pad, dilation, dtype):
            winograd.append(w_shape)
            return kernels.WINOGRAD_PLAN
        return kernels.heuristic_plan(stride, w_shape[2:])

    monkeypatch.setattr(autotune, "conv_plan", plan)
    run = jax.jit(lambda p, b: (test_net.layer_outputs(p, b, None, False),
                                test_net.gradients(p, b, None, False)))
    (outputs, loss), (_, grads, diffs) = run(golden_params, golden_batch)
    assert len(set(winograd)) == 3  # conv3, conv4, conv5 (in the forward and the gradients)
    blobs = np.load(golden / "forward_blobs.npz")
    for key in blobs.files:
        if key not in DATA_TOPS:
            assert_blob_close(key, outputs[key][0], blobs[key])
    assert float(loss) == pytest.approx(float(blobs["loss"]), abs=SCALAR_ATOL)
    param_grads = np.load(golden / "param_grads.npz")
    for key in param_grads.files:
        layer, index = key.split("/")
        assert_blob_close(key, grads[layer][int(index)], param_grads[key])
    blob_grads = np.load(golden / "blob_grads.npz")
    for key in blob_grads.files:
        assert_blob_close(key, diffs[key], blob_grads[key])


def test_train_phase_dropout_is_deterministic_per_rng(golden):
    with contextlib.chdir(golden):
        net = Net.from_prototxt("net.prototxt", "TRAIN")
    params = net.init(jax.random.PRNGKey(0))
    batch = net.random_batch(jax.random.PRNGKey(1), num_classes=10)
    run = jax.jit(lambda p, b, r: net.apply(p, b, r, True, blobs=("fc7",)))
    a, _ = run(params, batch, jax.random.PRNGKey(5))
    b, _ = run(params, batch, jax.random.PRNGKey(5))
    c, _ = run(params, batch, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(a["fc7"]), np.asarray(b["fc7"]))
    assert not np.array_equal(np.asarray(a["fc7"]), np.asarray(c["fc7"]))
    dropped = np.asarray(a["fc7"]) == 0
    assert 0.3 < dropped.mean() < 0.9  # dropout 0.5 after a ReLU


def test_input_shapes_must_name_fed_tops(golden, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImagenetError, match="'images'"):
        Net.from_prototxt(golden / "net.prototxt", "TEST",
                          input_shapes={"data": (2, 3, 57, 57), "images": (2, 3)})
