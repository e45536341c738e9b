"""The jitted functions of training and testing: pure functions of explicit state.

- `TrainState`: learnable blobs in `learnable_params` order, the optimizer state (Caffe's
  history blobs), the iteration and the base RNG key. Dropout keys are fold_in(rng, iteration),
  data crops/mirrors come from data/pipeline.py keyed on (seed, batch index), so iteration i is
  a pure function of the state and i.
- `make_train_step` -> train_step(state, batch, hyper): iter_size forward/backward passes with
  the gradients accumulated (Caffe's diffs), then the solver's update (model/solver.py). batch:
  uint8 images + crop offsets + mirror flags + labels per pass; the DataTransformer's float work
  (mean, scale, mirror) runs inside the step (`net_inputs`). hyper: the float32 values of this
  iteration (the learning rate is computed on the host in double, like Caffe).
- `make_forward`: one TEST (or TRAIN) forward for `caffe test` and the test nets;
  `make_train_forward`: Solve's last TRAIN forward, which updates BatchNorm's statistics.
- `precision="bf16"` computes in bfloat16 with float32 master weights and optimizer state.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.errors import ImagenetError
from data.transform import transform_batch
from model import backend
from model.feed import FedNet
from model.net import Net, Params
from model.solver import CaffeSolver

PRECISIONS = ("fp32", "bf16")


def net_inputs(fed: FedNet, arrays: Mapping[str, Any], k: int, dtype: Any) -> dict[str, Any]:
    """The Data tops of pass k: device-side DataTransformer output and labels."""
    feed: dict[str, Any] = {}
    for name, src in fed.sources.items():
        a = arrays[name]
        data = transform_batch(a["images"][k], a["offsets"][k], a["mirror"][k], fed.means[name],
                               src.plan.scale)
        feed[src.tops[0]] = data.astype(dtype)
        if len(src.tops) > 1:
            feed[src.tops[1]] = a["labels"][k]
    return feed



class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    params: tuple      # learnable blobs, learnable_params order
    opt_state: Any     # the optimizer's state (Caffe's history blobs at its end)
    iteration: jax.Array
    rng: jax.Array     # base key; iteration i uses fold_in(rng, i)


def flatten_params(net: Net, params: Params) -> tuple:
    return tuple(jnp.asarray(params[r.layer][r.index], jnp.float32) for r in net.learnable_params)


def unflatten_params(net: Net, flat: Sequence[Any], template: Params) -> Params:
    out: Params = {name: [None] * len(blobs) for name, blobs in template.items()}
    for ref, value in zip(net.learnable_params, flat):
        out[ref.layer][ref.index] = value
    return out


def merge_statistics(net: Net, flat: tuple, updates: Mapping[str, Sequence[Any]]) -> tuple:
    """The flat params with the blobs a TRAIN forward wrote itself (BatchNorm's running
    statistics, Net.apply_with_updates) replaced by their new values."""
    if not updates:
        return flat
    out = list(flat)
    for i, r in enumerate(net.learnable_params):
        if not r.learnable and r.layer in updates:
            out[i] = updates[r.layer][r.index].astype(jnp.float32)
    return tuple(out)


# The XLA:CPU options of the jitted train step (model/backend.py chooses them per platform).
TRAIN_STEP_COMPILER_OPTIONS = backend.train_step_options("cpu")


def make_train_step(fed: FedNet, solver: CaffeSolver, template: Params, *,
                    precision: str = "fp32") -> Callable:
    """train_step(state, batch, hyper) -> (new_state, metrics); pure, jit it.

    batch: stack_batches output (iter_size passes); hyper: {"lr", "adam_correction"} float32.
    metrics: {"loss": mean loss over the passes, "outputs": the last pass's net outputs}.
    """
    if precision not in PRECISIONS:
        raise ImagenetError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    net = fed.net
    iter_size = int(solver.param.iter_size)
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32
    refs = net.learnable_params
    frozen = [i for i, r in enumerate(refs) if not r.learnable]

    def loss_fn(flat, feed, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        tops, loss, updates = net.apply_with_updates(p, feed, rng, train=True)
        return loss.astype(jnp.float32), (tops, updates)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, Any], hyper: Mapping[str, Any]
                   ) -> tuple[TrainState, dict[str, Any]]:
        flat = state.params
        step_rng = jax.random.fold_in(state.rng, state.iteration)
        total_loss = jnp.float32(0)
        grads = None
        tops: dict[str, Any] = {}
        for k in range(iter_size):
            feed = net_inputs(fed, batch, k, compute)
            (loss, (tops, updates)), g = grad_fn(flat, feed, jax.random.fold_in(step_rng, k))
            # Caffe accumulates diffs over the iter_size passes, then Normalize divides
            grads = g if grads is None else tuple(a + b for a, b in zip(grads, g))
            total_loss = total_loss + loss
            flat = merge_statistics(net, flat, updates)
        new_params, opt_state = solver.update(grads, state.opt_state, flat, hyper)
        if frozen:
            new_params = tuple(flat[i] if i in frozen else p for i, p in enumerate(new_params))
        metrics = {"loss": total_loss / jnp.float32(iter_size),
                   "outputs": {k: v.astype(jnp.float32) for k, v in tops.items()}}
        return TrainState(new_params, opt_state, state.iteration + 1, state.rng), metrics

    return train_step


def make_forward(fed: FedNet, template: Params, *, train: bool, precision: str = "fp32"
                 ) -> Callable:
    """forward(flat_params, batch, rng) -> (loss, outputs) for one pass (k = 0)."""
    net = fed.net
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32

    def forward(flat, batch, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        feed = net_inputs(fed, batch, 0, compute)
        tops, loss = net.apply(p, feed, rng, train=train)
        return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in tops.items()}

    return forward


def make_train_forward(fed: FedNet, template: Params, *, precision: str = "fp32") -> Callable:
    """forward(flat_params, batch, rng) -> (loss, flat_params with the statistics this TRAIN
    forward wrote): a Net::Forward in TRAIN, which updates BatchNorm's running statistics
    (batch_norm_layer.cpp) without any parameter update."""
    net = fed.net
    compute = jnp.bfloat16 if precision == "bf16" else jnp.float32

    def forward(flat, batch, rng):
        p = unflatten_params(net, [x.astype(compute) for x in flat], template)
        feed = net_inputs(fed, batch, 0, compute)
        _, loss, updates = net.apply_with_updates(p, feed, rng, train=True)
        return loss.astype(jnp.float32), merge_statistics(net, flat, updates)

    return forward


def jit_train_step(fed: FedNet, solver: CaffeSolver, template: Params, *,
                   replicated: jax.sharding.Sharding, precision: str = "fp32") -> Callable:
    """make_train_step jitted as the Solver runs it: the state donated (updated in place),
    state and metrics replicated over the devices, traced and compiled for their platform
    (its kernels and XLA options: model/backend.py)."""
    platform = next(iter(replicated.device_set)).platform
    return jax.jit(backend.traced_for(make_train_step(fed, solver, template,
                                                      precision=precision), platform),
                   out_shardings=(replicated, replicated), donate_argnums=(0,),
                   compiler_options=backend.train_step_options(platform) or None)


def jit_for(fn: Callable, devices: Sequence[Any], **jit_kwargs: Any) -> Callable:
    """jax.jit of a forward that will run on `devices`, traced with their platform's kernels."""
    return jax.jit(backend.traced_for(fn, devices[0].platform), **jit_kwargs)


def place_state(solver: CaffeSolver, flat: tuple, history: Sequence[Any] | None,
                iteration: int, seed: int, replicated: jax.sharding.Sharding) -> TrainState:
    """A TrainState on the devices: fresh optimizer state, or Caffe's history blobs restored."""
    opt_state = solver.init(flat)
    if history is not None:
        opt_state = solver.with_history(opt_state, history)
    state = TrainState(flat, opt_state, jnp.asarray(iteration, jnp.int32),
                       jax.random.PRNGKey(seed))
    # from host values: every process passes the same ones to the replicated placement
    return jax.device_put(jax.tree.map(np.asarray, state), replicated)
