"""Caffe's solvers: learning-rate policies and update rules as optax transformations.

Owns the arithmetic of src/caffe/solvers/sgd_solver.cpp (GetLearningRate, ClipGradients,
Normalize, Regularize, ComputeUpdateValue) and its siblings nesterov_solver.cpp,
adagrad_solver.cpp, rmsprop_solver.cpp, adadelta_solver.cpp and adam_solver.cpp, so a tuned
solver.prototxt means the same thing here as in Caffe.

Conventions
- The optimizer works on a tuple of arrays in the net's `learnable_params` order (Caffe's
  `net_->learnable_params()`); its state holds the history blobs in exactly the order Caffe's
  `history_` vector holds them (AdaDelta and Adam: N first-moment blobs, then N second-moment
  blobs), so `.solverstate` history round-trips one to one.
- The learning rate is computed on the host each iteration in double from the float32 proto
  values; each blob's local rate = float(rate * lr_mult) (README section 9 of the goldens: Caffe's
  rate at iter 10 is the double 0.000999999992549419). The local rates enter the jitted update as
  an argument (`hyper`), so one compiled step serves every iteration.
- Updates follow optax's sign convention: `optax.apply_updates(w, u)` gives `w - diff` where
  `diff` is what Caffe's `Net::Update()` subtracts (negation is exact, so this is bit-identical).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data.errors import ImagenetError
from data.proto import caffe_pb2

Params = tuple  # tuple of jax arrays in learnable_params order


# --------------------------------------------------------------------------------------------
# Learning-rate policies (sgd_solver.cpp, SGDSolver::GetLearningRate)
# --------------------------------------------------------------------------------------------

def _lr_fixed(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # fixed: base_lr
    return float(p.base_lr), step


def _lr_step(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # step: base_lr * gamma ^ floor(iter / stepsize); current_step_ = iter / stepsize
    if p.stepsize <= 0:
        raise ImagenetError(f"lr_policy 'step' needs stepsize > 0, got stepsize: {p.stepsize}")
    if p.gamma < 0:
        raise ImagenetError(f"lr_policy 'step' needs gamma >= 0, got gamma: {p.gamma}")
    step = it // p.stepsize
    return float(p.base_lr) * math.pow(float(p.gamma), step), step


def _lr_exp(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # exp: base_lr * gamma ^ iter
    return float(p.base_lr) * math.pow(float(p.gamma), it), step


def _lr_inv(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # inv: base_lr * (1 + gamma * iter) ^ (-power)
    return float(p.base_lr) * math.pow(1.0 + float(p.gamma) * it, -float(p.power)), step


def _lr_multistep(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # multistep: base_lr * gamma ^ current_step, where current_step advances by ONE per call
    # when iter >= stepvalue[current_step] (Caffe uses `if`, not `while`: a resume past several
    # stepvalues catches up one step per iteration, and so do we).
    if step < len(p.stepvalue) and it >= p.stepvalue[step]:
        step += 1
    return float(p.base_lr) * math.pow(float(p.gamma), step), step


def _lr_poly(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # poly: base_lr * (1 - iter/max_iter) ^ power
    if p.max_iter <= 0:
        raise ImagenetError(f"lr_policy 'poly' needs max_iter > 0, got max_iter: {p.max_iter}")
    return float(p.base_lr) * math.pow(1.0 - it / float(p.max_iter), float(p.power)), step


def _lr_sigmoid(p: caffe_pb2.SolverParameter, it: int, step: int) -> tuple[float, int]:
    # sigmoid: base_lr * 1 / (1 + exp(-gamma * (iter - stepsize)))
    return float(p.base_lr) / (1.0 + math.exp(-float(p.gamma) * (it - float(p.stepsize)))), step


LR_POLICIES: dict[str, Callable[[caffe_pb2.SolverParameter, int, int], tuple[float, int]]] = {
    "fixed": _lr_fixed,
    "step": _lr_step,
    "exp": _lr_exp,
    "inv": _lr_inv,
    "multistep": _lr_multistep,
    "poly": _lr_poly,
    "sigmoid": _lr_sigmoid,
}


def learning_rate(param: caffe_pb2.SolverParameter, iteration: int,
                  current_step: int = 0) -> tuple[float, int]:
    """Caffe's rate at `iteration` (a double), and the new current_step.

    Computed in double from the float32 proto fields, like Caffe.
    `current_step` is the SolverState field: only 'step' and 'multistep' change it.
    """
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        raise ImagenetError(
            f"unknown lr_policy {policy!r} in the solver; valid: {', '.join(sorted(LR_POLICIES))}")
    rate, step = LR_POLICIES[policy](param, int(iteration), int(current_step))
    return rate, step


# --------------------------------------------------------------------------------------------
# Solver types
# --------------------------------------------------------------------------------------------

# Caffe's deprecated `solver_type` enum, upgraded to `type` (upgrade_proto.cpp
# UpgradeSolverType).
_LEGACY_SOLVER_TYPE = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta",
                       5: "Adam"}

# How many history blobs per learnable blob each solver keeps (Caffe's history_ vector).
HISTORY_PER_PARAM = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2,
                     "Adam": 2}

REGULARIZATION_TYPES = ("L2", "L1")


def solver_type(param: caffe_pb2.SolverParameter) -> str:
    """The solver type name, upgrading the legacy `solver_type` enum like Caffe."""
    if param.HasField("solver_type") and not param.HasField("type"):
        return _LEGACY_SOLVER_TYPE[int(param.solver_type)]
    name = param.type
    if name not in HISTORY_PER_PARAM:
        raise ImagenetError(
            f"unknown solver type {name!r}; valid: {', '.join(HISTORY_PER_PARAM)}")
    return name


class ParamMults(NamedTuple):
    """Per-blob multipliers, in learnable_params order (Caffe's net_params_lr/_weight_decay)."""
    lr_mult: tuple[float, ...]
    decay_mult: tuple[float, ...]


class CaffeState(NamedTuple):
    """Optimizer state: Caffe's history_ blobs, in Caffe's order."""
    history: tuple


def _history_init(n_per_param: int) -> Callable[[Params], CaffeState]:
    def init(params: Params) -> CaffeState:
        # one buffer per history blob (not the same zeros repeated): the jitted step donates
        # its state, and XLA refuses to donate one buffer twice
        return CaffeState(history=tuple(jnp.zeros_like(p) for _ in range(n_per_param)
                                        for p in params))
    return init


def clip_gradients(clip: float) -> optax.GradientTransformation:
    """ClipGradients: scale every diff by clip/||g|| when the global L2 norm exceeds `clip`.

    Caffe sums each blob's sumsq in float and takes sqrt in float; we do the same in float32.
    """
    def init(params: Params) -> optax.EmptyState:
        return optax.EmptyState()

    def update(grads: Params, state: Any, params: Params | None = None) -> tuple[Params, Any]:
        if clip < 0:
            return grads, state
        sumsq = jnp.float32(0)
        for g in grads:
            sumsq = sumsq + jnp.sum(jnp.square(g))
        norm = jnp.sqrt(sumsq)
        scale = jnp.where(norm > clip, jnp.float32(clip) / norm, jnp.float32(1))
        return tuple(jnp.where(norm > clip, g * scale, g) for g in grads), state

    return optax.GradientTransformation(init, update)


def normalize(iter_size: int) -> optax.GradientTransformation:
    """Normalize: diffs accumulated over iter_size passes are scaled by 1/iter_size."""
    factor = np.float32(1.0) / np.float32(iter_size)

    def init(params: Params) -> optax.EmptyState:
        return optax.EmptyState()

    def update(grads: Params, state: Any, params: Params | None = None) -> tuple[Params, Any]:
        if iter_size == 1:
            return grads, state
        return tuple(g * factor for g in grads), state

    return optax.GradientTransformation(init, update)


def regularize(weight_decay: float, decay_mult: Sequence[float],
               kind: str) -> optax.GradientTransformation:
    """Regularize: L2 adds local_decay*w, L1 adds local_decay*sign(w) (local_decay in float)."""
    if kind not in REGULARIZATION_TYPES:
        raise ImagenetError(f"unknown regularization_type {kind!r}; valid: "
                            f"{', '.join(REGULARIZATION_TYPES)}")
    local = [np.float32(weight_decay) * np.float32(m) for m in decay_mult]

    def init(params: Params) -> optax.EmptyState:
        return optax.EmptyState()

    def update(grads: Params, state: Any, params: Params | None = None) -> tuple[Params, Any]:
        out = []
        for g, w, d in zip(grads, params, local):
            if d == 0:
                out.append(g)
            elif kind == "L2":
                out.append(g + d * w)
            else:
                out.append(g + d * jnp.sign(w))
        return tuple(out), state

    return optax.GradientTransformation(init, update)


def caffe_update(kind: str, param: caffe_pb2.SolverParameter,
                 lr_mult: Sequence[float]) -> optax.GradientTransformationExtraArgs:
    """ComputeUpdateValue of solver `kind`; `update(..., hyper=...)` needs
    hyper['local_rates'] (float32, one per blob) and, for Adam, hyper['adam_correction'] (see
    `CaffeSolver.step_hyper`). Returns -diff."""
    momentum = jnp.float32(param.momentum)
    delta = jnp.float32(param.delta)
    rms_decay = jnp.float32(param.rms_decay)
    one = jnp.float32(1)
    n_hist = HISTORY_PER_PARAM[kind]

    def update(grads: Params, state: CaffeState, params: Params | None = None, *,
               hyper: dict[str, jax.Array], **_: Any) -> tuple[Params, CaffeState]:
        n = len(grads)
        rates = [hyper["local_rates"][i] for i in range(len(grads))]
        hist = list(state.history)
        diffs = []
        for i, (g, r) in enumerate(zip(grads, rates)):
            if kind == "SGD":
                # history = local_rate * diff + momentum * history; diff = history
                h = r * g + momentum * hist[i]
                hist[i] = h
                diffs.append(h)
            elif kind == "Nesterov":
                # update = history; history = momentum*history + local_rate*diff;
                # diff = (1+momentum)*history - momentum*update
                prev = hist[i]
                h = r * g + momentum * prev
                hist[i] = h
                diffs.append((one + momentum) * h - momentum * prev)
            elif kind == "AdaGrad":
                # history += diff^2; diff = local_rate * diff / (sqrt(history) + delta)
                h = hist[i] + g * g
                hist[i] = h
                diffs.append(r * (g / (jnp.sqrt(h) + delta)))
            elif kind == "RMSProp":
                # history = (1-rms_decay)*diff^2 + rms_decay*history;
                # diff = local_rate * diff / (sqrt(history) + delta)
                h = (one - rms_decay) * (g * g) + rms_decay * hist[i]
                hist[i] = h
                diffs.append(g / (jnp.sqrt(h) + delta) * r)
            elif kind == "AdaDelta":
                # history_g = (1-m)*g^2 + m*history_g
                # upd = sqrt((history_u + delta) / (history_g + delta)); diff = g * upd
                # history_u = (1-m)*diff^2 + m*history_u; diff *= local_rate
                hg = (one - momentum) * (g * g) + momentum * hist[i]
                u = jnp.sqrt((hist[n + i] + delta) / (hg + delta))
                d = g * u
                hist[n + i] = (one - momentum) * (d * d) + momentum * hist[n + i]
                hist[i] = hg
                diffs.append(r * d)
            elif kind == "Adam":
                # m = (1-b1)*g + b1*m; v = (1-b2)*g^2 + b2*v;
                # diff = local_rate*correction * g / (sqrt(v) + eps_hat)
                beta2 = jnp.float32(param.momentum2)
                m = (one - momentum) * g + momentum * hist[i]
                v = (one - beta2) * (g * g) + beta2 * hist[n + i]
                hist[i], hist[n + i] = m, v
                diffs.append((r * hyper["adam_correction"]) * (g / (jnp.sqrt(v) + delta)))
            else:  # guarded by solver_type(); kept so a new name cannot fall through silently
                raise ImagenetError(f"solver type {kind!r} has no update rule")
        return tuple(-d for d in diffs), CaffeState(history=tuple(hist))

    return optax.GradientTransformationExtraArgs(_history_init(n_hist), update)


@dataclass(frozen=True)
class CaffeSolver:
    """A SolverParameter made executable: the optax chain plus the host-side schedule."""
    param: caffe_pb2.SolverParameter
    kind: str
    mults: ParamMults
    tx: optax.GradientTransformationExtraArgs

    @property
    def history_per_param(self) -> int:
        return HISTORY_PER_PARAM[self.kind]

    def step_hyper(self, iteration: int, current_step: int) -> tuple[dict[str, np.ndarray], int]:
        """Per-iteration scalars for the jitted update, and the new current_step.

        hyper['lr'] is the double rate (for logs); hyper['local_rates'] the float32
        rate * lr_mult of each blob, rounded once from double."""
        rate, step = learning_rate(self.param, iteration, current_step)
        hyper = {"lr": np.float64(rate),
                 "local_rates": np.asarray([rate * m for m in self.mults.lr_mult], np.float32),
                 "adam_correction": np.float32(1)}
        if self.kind == "Adam":
            t = iteration + 1  # adam_solver.cpp: const int t = this->iter_ + 1
            b1, b2 = float(np.float32(self.param.momentum)), float(np.float32(self.param.momentum2))
            hyper["adam_correction"] = np.float32(math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t))
        return hyper, step

    def init(self, params: Params) -> Any:
        return self.tx.init(params)

    def update(self, grads: Params, opt_state: Any, params: Params,
               hyper: dict[str, jax.Array]) -> tuple[Params, Any]:
        """Caffe's ApplyUpdate minus the net: returns the new params and optimizer state."""
        updates, opt_state = self.tx.update(grads, opt_state, params, hyper=hyper)
        return optax.apply_updates(params, updates), opt_state

    # history <-> optimizer state (the .solverstate round trip)
    def history(self, opt_state: Any) -> tuple:
        return opt_state[-1].history

    def with_history(self, opt_state: Any, history: Sequence[Any]) -> Any:
        old = self.history(opt_state)
        if len(history) != len(old):
            raise ImagenetError(
                f"Incorrect length of history blobs: the solverstate has {len(history)}, "
                f"the {self.kind} solver for this net needs {len(old)}")
        new = []
        for i, (h, o) in enumerate(zip(history, old)):
            h = jnp.asarray(h, dtype=jnp.float32)
            if h.size != o.size:
                raise ImagenetError(f"history blob {i} has {h.size} values, the net's blob has "
                                    f"shape {tuple(o.shape)}")
            new.append(h.reshape(o.shape))
        return (*opt_state[:-1], CaffeState(history=tuple(new)))


def check_solver(param: caffe_pb2.SolverParameter, kind: str, where: str = "") -> None:
    """Caffe's CHECKs on solver settings, and the range checks Caffe lacks (a negative base_lr
    climbs the loss, a negative weight_decay grows the weights: Caffe trains on without a word),
    raised as user errors naming the file (`where`) and the offending values."""
    def fail(message: str) -> None:
        raise ImagenetError(f"{where}: {message}" if where else message)

    if param.lr_policy not in LR_POLICIES:
        fail(f"unknown lr_policy {param.lr_policy!r}; valid: {', '.join(sorted(LR_POLICIES))}")
    if param.iter_size < 1:
        fail(f"iter_size must be >= 1, got {param.iter_size}")
    if kind in ("AdaGrad", "RMSProp") and param.momentum != 0:
        # adagrad_solver.cpp / rmsprop_solver.cpp constructor checks
        fail(f"Momentum cannot be used with {kind} (momentum: {param.momentum})")
    if kind == "RMSProp" and not (0 <= param.rms_decay < 1):
        fail(f"rms_decay should lie in [0, 1), got {param.rms_decay}")
    if param.average_loss < 1:
        fail(f"average_loss should be non-negative, got {param.average_loss}")
    for name in ("base_lr", "weight_decay", "momentum", "momentum2", "delta", "gamma", "power"):
        value = getattr(param, name)
        if not math.isfinite(value) or value < 0:
            fail(f"{name} must be a finite number >= 0, got {str(np.float32(value))}")
    for name in ("max_iter", "snapshot", "display", "test_interval"):
        if getattr(param, name) < 0:
            fail(f"{name} must be >= 0, got {getattr(param, name)}")
    if any(n < 0 for n in param.test_iter):
        fail(f"test_iter must be >= 0, got {list(param.test_iter)}")
    if param.momentum >= 1:
        fail(f"momentum must be below 1 (at 1 and above no gradient is ever forgotten: the "
             f"steps grow without bound), got {param.momentum}")
    if kind == "Adam" and param.momentum2 >= 1:
        fail(f"momentum2 must be below 1, got {param.momentum2}")
    if param.lr_policy == "step" and param.stepsize <= 0:
        fail(f"lr_policy \"step\" needs stepsize > 0, got {param.stepsize}")  # sgd_solver.cpp
    if param.lr_policy == "multistep" and list(param.stepvalue) != sorted(set(param.stepvalue)):
        fail(f"lr_policy \"multistep\" needs increasing stepvalues, got "
             f"{list(param.stepvalue)}")


def build_solver(param: caffe_pb2.SolverParameter, lr_mult: Sequence[float],
                 decay_mult: Sequence[float]) -> CaffeSolver:
    """The Caffe solver for `param` over blobs with these multipliers (learnable_params order).

    Order per iteration, as in SGDSolver::ApplyUpdate: ClipGradients, then per blob Normalize
    (iter_size), Regularize (weight decay), ComputeUpdateValue; then Net::Update.
    """
    kind = solver_type(param)
    check_solver(param, kind)
    tx = optax.chain(
        clip_gradients(float(param.clip_gradients)),
        normalize(int(param.iter_size)),
        regularize(float(param.weight_decay), decay_mult, param.regularization_type),
        caffe_update(kind, param, lr_mult),
    )
    return CaffeSolver(param=param, kind=kind,
                       mults=ParamMults(tuple(map(float, lr_mult)), tuple(map(float, decay_mult))),
                       tx=tx)


def read_solver(path: str) -> caffe_pb2.SolverParameter:
    """SolverParameter from a solver.prototxt (protobuf text format).

    Uses model.prototxt.read_solver_parameter when the net engineer's module provides it (it
    reports parse errors with file and line); otherwise parses here.
    """
    try:
        from model.prototxt import read_solver_parameter  # type: ignore[attr-defined]
    except ImportError:
        read_solver_parameter = None
    if read_solver_parameter is not None:
        return read_solver_parameter(path)
    from google.protobuf import text_format
    param = caffe_pb2.SolverParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), param)
    except OSError as e:
        raise ImagenetError(f"cannot read solver {path}: {e}") from e
    except text_format.ParseError as e:
        raise ImagenetError(f"{path}:{e}") from e
    return param
