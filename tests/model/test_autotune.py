"""model/autotune.py: plans measured once per machine, cached under its fingerprint, used by
model.kernels.conv2d, and never measured outside "auto" mode.

The measurements here are of a tiny convolution with two candidate plans (a fraction of a
second); which plan wins is whatever this machine says, so the tests check that the winner
is the fastest of the timings recorded beside it (or the built-in rule within the margin of
it), never a particular plan.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.errors import ImagenetError
from model import autotune, kernels, machine

X_SHAPE, W_SHAPE = (2, 4, 9, 9), (6, 2, 3, 3)  # groups 2, pad 1
TWO_PLANS = (kernels.XLA_PLAN, kernels.GEMM_PLAN)


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """'auto' mode, a private cache dir, every shape worth measuring, two candidates."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(autotune.MODE_ENV, "auto")
    monkeypatch.setattr(autotune, "MIN_TUNED_GFLOP", 0.0)
    monkeypatch.setattr(kernels, "candidate_plans", lambda *geometry: TWO_PLANS)
    notes: list[str] = []
    autotune.forget()
    autotune.configure(notify=notes.append)
    yield notes
    autotune.configure()
    autotune.forget()


def _conv_and_grads(x, w):
    def loss(a, b):
        return jnp.sum(kernels.conv2d(a, b, None, 1, 1, 1, 2) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def test_auto_measures_once_caches_and_matches_the_reference(tuning):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    w = rng.standard_normal(W_SHAPE).astype(np.float32)
    value, grads = _conv_and_grads(x, w)  # traced once: the plan is measured inside the trace

    (key, result), = autotune.measured()
    assert key.x_shape == X_SHAPE and key.groups == 2 and key.dtype == "float32"
    assert set(result.ms) == {p.name for p in TWO_PLANS}
    rule = kernels.heuristic_plan((1, 1), (3, 3))
    fastest = min(result.ms.values())
    # the fastest plan, or the built-in rule where it is within the margin of the fastest
    assert (result.ms[result.plan.name] == fastest
            or (result.plan == rule
                and result.ms[rule.name] <= (1 + autotune.KEEP_RULE_MARGIN) * fastest))
    assert len(tuning) == 2 and "measuring convolution plans" in tuning[0]

    entries = json.loads(autotune.cache_path().read_text())["machines"][machine.fingerprint()]
    assert entries[key.text()]["plan"] == result.plan.name

    # Same numbers as XLA's own convolution, whichever plan won.
    ref = jax.value_and_grad(lambda a, b: jnp.sum(
        kernels.conv2d_reference(a, b, None, 1, 1, 1, 2) ** 2), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(value, ref[0], rtol=1e-5)
    for got, want in zip(grads, ref[1]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())

    # A new process (forgotten state) reads the file and measures nothing.
    autotune.forget()
    plan = autotune.conv_plan(X_SHAPE, W_SHAPE, (1, 1), (1, 1), (1, 1), 2, "float32")
    assert plan == result.plan and autotune.measured() == []


def test_cached_and_heuristic_modes_never_measure(tuning, monkeypatch):
    key_args = (X_SHAPE, W_SHAPE, (1, 1), (1, 1), (1, 1), 2, "float32")
    rule = kernels.heuristic_plan((1, 1), (3, 3))
    monkeypatch.setenv(autotune.MODE_ENV, "cached")
    assert autotune.conv_plan(*key_args) == rule
    # Another machine's (or jax's) entry is not this machine's.
    other = {"version": autotune.CACHE_VERSION, "machines": {"another CPU": {
        autotune.ConvKey(*key_args).text(): {"plan": kernels.XLA_PLAN.name}}}}
    autotune.cache_path().write_text(json.dumps(other))
    autotune.forget()
    assert autotune.conv_plan(*key_args) == rule
    # This machine's entry is used; a damaged file is no entry at all.
    here = {"version": autotune.CACHE_VERSION, "machines": {machine.fingerprint(): {
        autotune.ConvKey(*key_args).text(): {"plan": kernels.XLA_PLAN.name}}}}
    autotune.cache_path().write_text(json.dumps(here))
    autotune.forget()
    assert autotune.conv_plan(*key_args) == kernels.XLA_PLAN
    monkeypatch.setenv(autotune.MODE_ENV, "heuristic")
    assert autotune.conv_plan(*key_args) == rule
    monkeypatch.setenv(autotune.MODE_ENV, "cached")
    autotune.cache_path().write_text("{not json")
    autotune.forget()
    assert autotune.conv_plan(*key_args) == rule
    assert autotune.measured() == [] and tuning == []


def test_unknown_mode_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv(autotune.MODE_ENV, "fastest")
    with pytest.raises(ImagenetError, match="IMAGENET_CONV_PLANS: unknown .* 'fastest'.*auto"):
        autotune.mode()


def test_plan_names_round_trip_and_bad_ones_fail():
    for plan in kernels.CANDIDATE_PLANS:
        assert kernels.ConvPlan.parse(plan.name) == plan
    with pytest.raises(ValueError, match="not a ConvPlan name"):
        kernels.ConvPlan.parse("fwd=gemm")
    with pytest.raises(ValueError, match="ConvPlan.weight_grad"):
        kernels.ConvPlan.parse("fwd=gemm dx=lax dw=fft")


def test_fingerprint_names_the_cpu_and_its_isa():
    info = machine.cpu_info()
    assert info.cores >= 1 and info.model
    text = machine.fingerprint()
    assert info.describe() in text and f"jax {jax.__version__}" in text
    parsed = machine._parse_cpuinfo("processor\t: 0\nmodel name\t: Some CPU\nflags\t: fpu avx2 "
                                    "amx_tile\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert parsed["model name"] == "Some CPU" and "amx_tile" in parsed["flags"]


def test_remeasure_replaces_a_cached_plan_once_per_process(tuning, monkeypatch):
    key_args = (X_SHAPE, W_SHAPE, (1, 1), (1, 1), (1, 1), 2, "float32")
    text = autotune.ConvKey(*key_args).text()
    stale = {"version": autotune.CACHE_VERSION, "machines": {machine.fingerprint(): {
        text: {"plan": "fwd=lax dx=col2im dw=lax"}}}}  # not a candidate here: must go
    autotune.cache_path().write_text(json.dumps(stale))
    monkeypatch.setenv(autotune.MODE_ENV, "remeasure")
    autotune.forget()
    plan = autotune.conv_plan(*key_args)
    assert plan in TWO_PLANS and len(autotune.measured()) == 1
    assert autotune.conv_plan(*key_args) == plan and len(autotune.measured()) == 1
    entry = json.loads(autotune.cache_path().read_text())["machines"][machine.fingerprint()][text]
    assert entry["plan"] == plan.name and entry["rounds"] >= autotune.ROUNDS


def test_candidates_are_timed_forward_and_backward():
    # The timed step returns the loss with the gradients: a loss linear in y under grad alone
    # let XLA drop the forward, so version 1 of the cache ranked plans by their gradients only.
    key = autotune.ConvKey(X_SHAPE, W_SHAPE, (1, 1), (1, 1), (1, 1), 2, "float32")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(X_SHAPE, np.float32))
    w = jnp.asarray(rng.standard_normal(W_SHAPE, np.float32))
    dy = jnp.asarray(rng.standard_normal((2, 6, 9, 9), np.float32))
    value, (dx, dw) = autotune._candidate_step(key, kernels.GEMM_PLAN, x, w, dy)()
    want = jnp.sum(kernels.conv2d_reference(x, w, None, 1, 1, 1, 2) * dy)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert dx.shape == X_SHAPE and dw.shape == W_SHAPE
