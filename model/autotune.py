"""Convolution plans chosen by measurement, once per machine, and cached.

Which way of computing a convolution is fastest (model/kernels.py's `candidate_plans`: XLA's
own convolution or im2col + GEMM forward, XLA's transposed convolution or GEMM + col2im input
gradient, GEMM or XLA weight gradient, and for 3x3 stride-1 float32 convolutions Winograd's
F(2x2, 3x3) in any pass) depends on the CPU, the XLA build, the dtype and the shape. On a
2-core AMD Zen 3 (AVX2) the GEMM paths won most AlexNet layers by 1.2-2.7x; on a 2-core
Zen 4 (AVX-512, jax 0.10's XLA handing convolutions to YNNPACK) no direct plan beat that rule
by 10% in float32, Winograd did on conv3-5, and in bf16 other plans beat it on every AlexNet
layer, by 1.1-2.5x (benchmarks/README.md). No rule written on one machine and dtype holds on
the next, so this module measures:

- A convolution is keyed by its input and weight shapes, stride, pad, dilation, groups and
  dtype. Every candidate plan's forward + both gradients (the loss returned with them, so that
  XLA cannot drop the forward) is jitted on random data of that
  shape and timed in interleaved rounds (a slow minute on a shared machine slows all the
  candidates, not one); after the first round, candidates more than PRUNE_RATIO slower than
  the best are dropped; the lowest wall time wins (more rounds where the load average says
  the machine is oversubscribed: OVERLOADED_PER_CORE), unless the built-in rule is within
  KEEP_RULE_MARGIN of it: the rule then stays.
- Results are stored in one JSON file per user (`conv_plans.json` in IMAGENET_CACHE_DIR, else
  $XDG_CACHE_HOME/imagenet-pipeline, else ~/.cache/imagenet-pipeline) under the machine's
  fingerprint (model/machine.py: CPU model, family, ISA flags, cores, jax/jaxlib version,
  XLA_FLAGS), with the timings and the load average they were measured under; written
  atomically (temporary file + rename). Another machine, core count or jax never reuses them.
- Only convolutions of at least MIN_TUNED_GFLOP (forward) are measured: below that,
  measuring costs more than a whole training run could save, and `heuristic_plan` applies.

MODES (IMAGENET_CONV_PLANS, else what `configure` set, else "auto"): "auto" measures what
the cache lacks, "remeasure" measures again what this process meets (a quieter hour, a new
driver), "cached" uses measured plans and never measures, "heuristic" ignores the
cache (the test suite's setting, and the default of multi-process training, whose processes
must not choose apart). A plan is chosen while a step is traced; measuring then
runs outside the trace (jax.ensure_compile_time_eval), before the step's own compilation, and
says so in one line to the `notify` callback (the command line prints it; else logging).
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data.atomic import write_bytes_atomic
from data.errors import ImagenetError
from model import kernels, machine
from model.kernels import ConvPlan, Pair

MODE_ENV = "IMAGENET_CONV_PLANS"
CACHE_DIR_ENV = "IMAGENET_CACHE_DIR"
MODES = {
    "auto": "measure the candidate plans of a convolution the cache lacks (once per machine)",
    "remeasure": "measure every convolution worth it again, replacing cached plans",
    "cached": "plans measured earlier on this machine, else the built-in rule; never measure",
    "heuristic": "the built-in rule (model/kernels.py heuristic_plan) only",
}
DEFAULT_MODE = "auto"
CACHE_FILE = "conv_plans.json"
# 2: the forward is timed too (version 1's candidates ran under grad of a loss linear in y,
# so XLA dropped the forward) and 3x3 stride-1 shapes have Winograd candidates.
CACHE_VERSION = 2
# Forward GFLOP below which a convolution is not worth measuring (AlexNet's at batch 32 are
# 4.5-7.1 GFLOP; alexnet_mini's and the digits nets' are below 0.1).
MIN_TUNED_GFLOP = 0.5
# Timed rounds per candidate after a warm-up call; candidates slower than PRUNE_RATIO x the
# best after the first round are not timed again.
ROUNDS = 3
PRUNE_RATIO = 1.5
# Scale of the random weights: AlexNet-like activations, so no denormals skew a timing.
WEIGHT_SCALE = 0.01
# Load average per core above which the machine counts as oversubscribed: candidates then run
# LOADED_ROUNDS rounds (the 2-core VMs here, shared by six sessions, ran 300 ms convolutions
# in 0.3-1.3 s of wall time at load 10). Still ranked by their best WALL time: CPU time would
# rank a plan that keeps one core busy as cheap as one that splits the same work over two
# (measured at load 7: conv3's XLA plan 216 ms wall / 335 ms CPU, the plan CPU time chose
# 320 / 322), and the best of several rounds is the round the scheduler disturbed least.
OVERLOADED_PER_CORE = 1.5
LOADED_ROUNDS = 6
# The built-in rule is kept unless another plan beats it by this fraction: on the shared
# 2-core VMs, plans within ~10% of each other swapped places from one run to the next
# (benchmarks/layers.py, 2026-12-01: conv2-conv5), while real differences are 1.3-2.6x
# (conv1's XLA plan; the bf16 plans).
KEEP_RULE_MARGIN = 0.10


@dataclass(frozen=True)
class ConvKey:
    """What a plan is chosen for (the traced shapes: per-device under data parallelism)."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    stride: Pair
    pad: Pair
    dilation: Pair
    groups: int
    dtype: str

    def text(self) -> str:
        return (f"x{list(self.x_shape)} w{list(self.w_shape)} s{list(self.stride)} "
                f"p{list(self.pad)} d{list(self.dilation)} g{self.groups} {self.dtype}")

    def forward_gflop(self) -> float:
        n, _, h, w = self.x_shape
        o, cg, kh, kw = self.w_shape
        ho, wo = kernels.conv_output_hw((h, w), (kh, kw), self.stride, self.pad, self.dilation)
        return 2.0 * n * o * ho * wo * cg * kh * kw / 1e9


@dataclass
class Measurement:
    plan: ConvPlan
    ms: dict[str, float]  # plan name -> best ms of forward + gradients (pruned ones: 1 round)
    seconds: float        # measuring time, compilation included
    rounds: int = ROUNDS  # timed rounds (more on an oversubscribed machine)
    loadavg: float = 0.0  # 1-minute load average when measuring began


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.mode: str | None = None
        self.notify: Callable[[str], None] | None = None
        self.plans: dict[str, str] | None = None  # key text -> plan name, this fingerprint
        self.measured: list[tuple[ConvKey, Measurement]] = []
        self.remeasured: set[str] = set()  # keys measured by this process (remeasure mode)


_STATE = _State()
_LOG = logging.getLogger(__name__)


def configure(mode: str | None = None, notify: Callable[[str], None] | None = None) -> None:
    """Set this process's mode (IMAGENET_CONV_PLANS still wins) and where the one-line notes
    on measuring go (default: logging, INFO)."""
    if mode is not None:
        _check_mode(mode, "configure(mode=...)")
    with _STATE.lock:
        _STATE.mode = mode
        _STATE.notify = notify


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ImagenetError(f"{where}: unknown conv plan mode {mode!r}; valid: "
                            + "; ".join(f"{k} ({v})" for k, v in MODES.items()))
    return mode


def mode() -> str:
    env = os.environ.get(MODE_ENV)
    if env:
        return _check_mode(env, MODE_ENV)
    if jax.process_count() > 1:
        # Processes of one training measure apart and could choose apart: every process
        # takes the same rule unless the user asks otherwise (IMAGENET_CONV_PLANS).
        return "heuristic"
    return _STATE.mode or DEFAULT_MODE


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "imagenet-pipeline" / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # A damaged cache only costs a new measurement: it is rewritten whole.
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return data


def _plans_here() -> dict[str, str]:
    with _STATE.lock:
        if _STATE.plans is None:
            entries = _read_cache(cache_path()).get("machines", {}).get(machine.fingerprint(), {})
            _STATE.plans = {k: v["plan"] for k, v in entries.items()
                            if isinstance(v, dict) and "plan" in v}
        return _STATE.plans


def _store(key: ConvKey, result: Measurement) -> None:
    """Merge one result into the cache file (re-read first: another process may have added
    its own) and write it atomically."""
    path = cache_path()
    data = _read_cache(path) or {"version": CACHE_VERSION, "machines": {}}
    entries = data.setdefault("machines", {}).setdefault(machine.fingerprint(), {})
    entries[key.text()] = {
        "plan": result.plan.name,
        "ms": {k: round(v, 2) for k, v in result.ms.items()},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rounds": result.rounds,
        "loadavg": round(result.loadavg, 2),
        "seconds": round(result.seconds, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), durable=False)


def conv_plan(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: Pair, pad: Pair,
              dilation: Pair, groups: int, dtype: str) -> ConvPlan:
    """The plan model.kernels.conv2d uses for this convolution (see MODES)."""
    key = ConvKey(tuple(x_shape), tuple(w_shape), stride, pad, dilation, groups, dtype)
    heuristic = kernels.heuristic_plan(stride, (w_shape[2], w_shape[3]))
    how = mode()
    if how == "heuristic":
        return heuristic
    with _STATE.lock:
        name = _plans_here().get(key.text())
        if name is not None and (how != "remeasure" or key.text() in _STATE.remeasured):
            try:
                return ConvPlan.parse(name)
            except ValueError:
                pass  # written by another version: measured again below, or the rule
        if how not in ("auto", "remeasure") or key.forward_gflop() < MIN_TUNED_GFLOP:
            return heuristic
        notify = _STATE.notify or _LOG.info
        notify(f"measuring convolution plans for {key.text()} (once on this machine; "
               f"cached in {cache_path()})")
        result = measure(key, keep=heuristic)
        _STATE.measured.append((key, result))
        _STATE.remeasured.add(key.text())
        _plans_here()[key.text()] = result.plan.name
        _store(key, result)
        notify(f"  chose {result.plan.name}: {result.ms[result.plan.name]:.0f} ms (built-in "
               f"rule {heuristic.name}: {result.ms.get(heuristic.name, math.nan):.0f} ms; best "
               f"of {result.rounds} rounds at load {result.loadavg:.1f}), measured in "
               f"{result.seconds:.0f} s")
        return result.plan


def measured() -> list[tuple[ConvKey, Measurement]]:
    """What this process measured (benchmarks report it apart from training time)."""
    with _STATE.lock:
        return list(_STATE.measured)


def forget() -> None:
    """Drop the in-memory plans (tests; after the cache file or the mode changed)."""
    with _STATE.lock:
        _STATE.plans = None
        _STATE.measured.clear()
        _STATE.remeasured.clear()


def _candidate_step(key: ConvKey, plan: ConvPlan, x: jax.Array, w: jax.Array, dy: jax.Array
                    ) -> Callable[[], object]:
    def loss(xx: jax.Array, ww: jax.Array, g: jax.Array) -> jax.Array:
        y = kernels.conv2d(xx, ww, None, key.stride, key.pad, key.dilation, key.groups,
                           plan=plan)
        return jnp.sum(y.astype(jnp.float32) * g)

    # Every array is an argument: a closed-over one would be a constant XLA folds at compile.
    # value_and_grad, not grad: the loss is linear in y, so under grad alone nothing needs y
    # and XLA drops the forward's GEMM or convolution, timing only the gradients.
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w, dy).compile()
    return lambda: jax.block_until_ready(step(x, w, dy))


def measure(key: ConvKey, plans: tuple[ConvPlan, ...] | None = None,
            rounds: int = ROUNDS, keep: ConvPlan | None = None) -> Measurement:
    """Time every plan (default: kernels.candidate_plans for the shape) forward + input and
    weight gradients on random data of `key`'s shape; runs eagerly even while a jit trace is
    open.
    The fastest wins, except that `keep` (the built-in rule) stays unless the fastest beats
    it by KEEP_RULE_MARGIN."""
    if plans is None:
        plans = kernels.candidate_plans(key.w_shape[2:], key.stride, key.pad, key.dilation,
                                        key.dtype)
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > OVERLOADED_PER_CORE * machine.cpu_info().cores:
        rounds = max(rounds, LOADED_ROUNDS)
    with jax.ensure_compile_time_eval():
        rng = np.random.default_rng(0)
        dtype = jnp.dtype(key.dtype)
        x = jnp.asarray(rng.standard_normal(key.x_shape, np.float32), dtype)
        w = jnp.asarray(rng.standard_normal(key.w_shape, np.float32) * WEIGHT_SCALE, dtype)
        n, _, h, wd = key.x_shape
        ho, wo = kernels.conv_output_hw((h, wd), key.w_shape[2:], key.stride, key.pad,
                                        key.dilation)
        dy = jnp.asarray(rng.standard_normal((n, key.w_shape[0], ho, wo), np.float32))
        steps = {p.name: _candidate_step(key, p, x, w, dy) for p in plans}
        for run in steps.values():
            run()  # first call: buffers allocated, pages faulted in
        best = {name: math.inf for name in steps}
        alive = list(steps)
        for r in range(max(1, rounds)):
            for name in alive:
                t0 = time.perf_counter()
                steps[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
            if r == 0:
                fastest = min(best[n] for n in alive)
                alive = [n for n in alive if best[n] <= PRUNE_RATIO * fastest]
    winner = min(best, key=best.__getitem__)
    if keep is not None and best.get(keep.name, math.inf) <= (1 + KEEP_RULE_MARGIN) * best[winner]:
        winner = keep.name
    return Measurement(ConvPlan.parse(winner), {k: v * 1e3 for k, v in best.items()},
                       time.perf_counter() - started, rounds, load)


__all__ = ["CACHE_DIR_ENV", "ConvKey", "MODES", "MODE_ENV", "Measurement", "cache_path",
           "configure", "conv_plan", "forget", "measure", "measured", "mode"]
