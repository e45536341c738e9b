"""Caffe's lr policies and solver update rules against float64 numpy references of the formulas
in src/caffe/solvers/*.cpp, over a few hundred iterations including lr changes."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from data.errors import ImagenetError
from data.proto import caffe_pb2
from model.solver import HISTORY_PER_PARAM, LR_POLICIES, build_solver, learning_rate

ITERS = 300


def solver_param(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def ref_rate(policy: str, p: dict, it: int, step: int) -> tuple[float, int]:
    """The documented formulas (solver.proto comments / sgd_solver.cpp) in float64."""
    base, gamma, power = p["base_lr"], p.get("gamma", 0.0), p.get("power", 0.0)
    if policy == "fixed":
        return base, step
    if policy == "step":
        return base * gamma ** (it // p["stepsize"]), it // p["stepsize"]
    if policy == "exp":
        return base * gamma ** it, step
    if policy == "inv":
        return base * (1 + gamma * it) ** (-power), step
    if policy == "multistep":
        if step < len(p["stepvalue"]) and it >= p["stepvalue"][step]:
            step += 1
        return base * gamma ** step, step
    if policy == "poly":
        return base * (1 - it / p["max_iter"]) ** power, step
    if policy == "sigmoid":
        return base / (1 + math.exp(-gamma * (it - p["stepsize"]))), step
    raise AssertionError(policy)


POLICY_CASES = {
    "fixed": dict(base_lr=0.01),
    "step": dict(base_lr=0.01, gamma=0.1, stepsize=70),
    "exp": dict(base_lr=0.01, gamma=0.99),
    "inv": dict(base_lr=0.01, gamma=0.0001, power=0.75),
    "multistep": dict(base_lr=0.01, gamma=0.5, stepvalue=[50, 120, 121, 250]),
    "poly": dict(base_lr=0.01, power=0.5, max_iter=ITERS),
    "sigmoid": dict(base_lr=0.01, gamma=-0.05, stepsize=150),
}


def to_text(policy: str, p: dict) -> str:
    lines = [f'lr_policy: "{policy}"']
    for k, v in p.items():
        for item in (v if isinstance(v, list) else [v]):
            lines.append(f"{k}: {item}")
    return "\n".join(lines)


def f32_fields(p: dict) -> dict:
    """Proto float fields hold float32 values: the reference starts from the same numbers."""
    return {k: (float(np.float32(v)) if isinstance(v, float) else v) for k, v in p.items()}


def test_every_policy_has_a_case() -> None:
    assert set(POLICY_CASES) == set(LR_POLICIES)


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_lr_policy_matches_formula(policy: str) -> None:
    p = POLICY_CASES[policy]
    param = solver_param(to_text(policy, p))
    ref_p = f32_fields(p)
    step = ref_step = 0
    rates = []
    for it in range(ITERS):
        rate, step = learning_rate(param, it, step)
        want, ref_step = ref_rate(policy, ref_p, it, ref_step)
        assert step == ref_step
        # same formula in double from the same float32 inputs (pow vs ** may differ in 1 ulp)
        assert rate == pytest.approx(want, rel=1e-14, abs=0), (policy, it, rate, want)
        rates.append(rate)
    if policy in ("step", "multistep"):
        assert len(set(rates)) > 2  # the run really crossed lr changes


def test_multistep_advances_one_step_per_call_like_caffe() -> None:
    # Caffe uses `if` (not `while`): resuming at iter 200 with current_step 0 catches up slowly
    param = solver_param(to_text("multistep", POLICY_CASES["multistep"]))
    _, step = learning_rate(param, 200, 0)
    assert step == 1
    _, step = learning_rate(param, 201, step)
    assert step == 2


def test_unknown_policy_lists_valid_ones() -> None:
    with pytest.raises(ImagenetError, match="valid: exp, fixed, inv, multistep"):
        learning_rate(solver_param('lr_policy: "cosine" base_lr: 0.1'), 0)


def ref_update(kind: str, g: np.ndarray, w: np.ndarray, hist: list[np.ndarray], *, rate: float,
               it: int, p: dict, lr_mult: float, decay_mult: float) -> np.ndarray:
    """One ComputeUpdateValue in float64 (after regularization); returns diff, mutates hist."""
    g = g + p["weight_decay"] * decay_mult * (w if p.get("reg", "L2") == "L2" else np.sign(w))
    r = rate * lr_mult
    m, delta = p.get("momentum", 0.0), p.get("delta", 1e-8)
    if kind == "SGD":
        hist[0] = m * hist[0] + r * g
        return hist[0]
    if kind == "Nesterov":
        prev = hist[0].copy()
        hist[0] = m * hist[0] + r * g
        return (1 + m) * hist[0] - m * prev
    if kind == "AdaGrad":
        hist[0] = hist[0] + g * g
        return r * g / (np.sqrt(hist[0]) + delta)
    if kind == "RMSProp":
        d = p["rms_decay"]
        hist[0] = (1 - d) * g * g + d * hist[0]
        return r * g / (np.sqrt(hist[0]) + delta)
    if kind == "AdaDelta":
        hist[0] = (1 - m) * g * g + m * hist[0]
        d = g * np.sqrt((hist[1] + delta) / (hist[0] + delta))
        hist[1] = (1 - m) * d * d + m * hist[1]
        return r * d
    if kind == "Adam":
        b2 = p["momentum2"]
        hist[0] = (1 - m) * g + m * hist[0]
        hist[1] = (1 - b2) * g * g + b2 * hist[1]
        t = it + 1
        corr = math.sqrt(1 - b2 ** t) / (1 - m ** t)
        return r * corr * g / (np.sqrt(hist[1]) + delta)
    raise AssertionError(kind)


SOLVER_CASES = {
    "SGD": dict(base_lr=0.01, momentum=0.9, weight_decay=0.0005),
    "Nesterov": dict(base_lr=0.01, momentum=0.95, weight_decay=0.0005),
    "AdaGrad": dict(base_lr=0.01, weight_decay=0.0005, delta=1e-6),
    "RMSProp": dict(base_lr=0.001, weight_decay=0.0005, rms_decay=0.98, delta=1e-6),
    "AdaDelta": dict(base_lr=1.0, momentum=0.95, weight_decay=0.0005, delta=1e-6),
    "Adam": dict(base_lr=0.001, momentum=0.9, momentum2=0.999, weight_decay=0.0005,
                 delta=1e-8),
}


def test_every_solver_type_has_a_case() -> None:
    assert set(SOLVER_CASES) == set(HISTORY_PER_PARAM)


@pytest.mark.parametrize("reg", ["L2", "L1"])
@pytest.mark.parametrize("kind", sorted(SOLVER_CASES))
def test_solver_update_matches_float64_reference(kind: str, reg: str) -> None:
    p = dict(SOLVER_CASES[kind], reg=reg)
    text = "\n".join([f'type: "{kind}"', 'lr_policy: "step"', "gamma: 0.5", "stepsize: 60",
                      f'regularization_type: "{reg}"']
                     + [f"{k}: {v}" for k, v in SOLVER_CASES[kind].items()])
    param = solver_param(text)
    lr_mult, decay_mult = (1.0, 2.0), (1.0, 0.0)
    solver = build_solver(param, lr_mult, decay_mult)
    rng = np.random.default_rng(7)
    w = (rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32))
    params = tuple(jax.numpy.asarray(x) for x in w)
    state = solver.init(params)
    assert len(solver.history(state)) == HISTORY_PER_PARAM[kind] * 2
    ref_w = [x.astype(np.float64) for x in w]
    ref_h = [[np.zeros_like(x) for _ in range(HISTORY_PER_PARAM[kind])] for x in ref_w]
    fp = f32_fields({k: v for k, v in p.items() if k != "reg"})
    fp["reg"] = reg
    # the state is donated, as the trainer's jitted step donates it: every history blob must
    # be a buffer of its own
    update = jax.jit(solver.update, donate_argnums=(1,))
    step, worst = 0, 0.0
    for it in range(ITERS):
        grads = tuple(rng.normal(size=x.shape).astype(np.float32) for x in w)
        hyper, step = solver.step_hyper(it, step)
        params, state = update(grads, state, params, hyper)
        rate, _ = ref_rate("step", dict(base_lr=fp["base_lr"], gamma=0.5, stepsize=60), it, 0)
        for i in range(2):
            diff = ref_update(kind, grads[i].astype(np.float64), ref_w[i], ref_h[i], rate=rate,
                              it=it, p=fp, lr_mult=lr_mult[i], decay_mult=decay_mult[i])
            ref_w[i] = ref_w[i] - diff
    for i in range(2):
        err = np.abs(np.asarray(params[i]) - ref_w[i]) / (np.abs(ref_w[i]) + 1e-3)
        worst = max(worst, float(err.max()))
    # float32 arithmetic over 300 steps vs float64: measured worst ~1e-6 (L1's sign(w) near 0
    # may flip between the two; weights stay far from 0 here)
    assert worst < 2e-5, (kind, reg, worst)
    for got, want in zip(solver.history(state)[::2][:1], [ref_h[0][0]]):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)


def test_clip_gradients_scales_by_global_norm() -> None:
    param = solver_param('type: "SGD" lr_policy: "fixed" base_lr: 1 clip_gradients: 1')
    solver = build_solver(param, (1.0, 1.0), (1.0, 1.0))
    params = (jax.numpy.zeros((2,)), jax.numpy.zeros((1,)))
    grads = (np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32))
    hyper, _ = solver.step_hyper(0, 0)
    new, _ = solver.update(grads, solver.init(params), params, hyper)
    np.testing.assert_allclose(np.asarray(new[0]), [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new[1]), [-0.8], rtol=1e-6)


def test_iter_size_divides_accumulated_gradient() -> None:
    param = solver_param('type: "SGD" lr_policy: "fixed" base_lr: 1 iter_size: 4')
    solver = build_solver(param, (1.0,), (1.0,))
    params = (jax.numpy.zeros((1,)),)
    hyper, _ = solver.step_hyper(0, 0)
    new, _ = solver.update((np.array([8.0], np.float32),), solver.init(params), params, hyper)
    np.testing.assert_allclose(np.asarray(new[0]), [-2.0])


def test_adagrad_refuses_momentum() -> None:
    with pytest.raises(ImagenetError, match="Momentum cannot be used with AdaGrad"):
        build_solver(solver_param('type: "AdaGrad" lr_policy: "fixed" momentum: 0.9'), (1,), (1,))


def test_unknown_solver_type_lists_valid_ones() -> None:
    with pytest.raises(ImagenetError, match="valid: SGD, Nesterov"):
        build_solver(solver_param('type: "Lion" lr_policy: "fixed"'), (1,), (1,))
