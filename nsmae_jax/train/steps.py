"""Pure per-device train and eval steps, independent of the parallel wrapper.

`train_step(state, batch, rng)` computes per-example losses with an rng folded from the step's
rng and the example's *global* index (device index x per-device batch + position), so the masks
and rays an example sees do not depend on how the global batch is split over devices: 1 device
with batch 2 and 2 devices with batch 1 follow the same trajectory. Gradients and metrics are
averaged with `lax.pmean(..., axis_name='batch')`; wrap the step with `jax.pmap(...,
axis_name='batch')` (loop.py does) or with shard_map over a mesh axis of the same name.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from nsmae_jax.models.dense import fold_example_axes

AXIS = 'batch'

# loss_fn(params, example_batch [1, ...], rng, train) -> (loss scalar, {'metrics': {...}})
LossFn = Callable[[Any, dict, jax.Array, bool], tuple[jax.Array, dict]]


class TrainState(train_state.TrainState):
  """Params + optimiser state + step. No rng lives in the state (folded from the step)."""


def _per_example(loss_fn: LossFn, params, batch: dict, rng: jax.Array, train: bool):
  """vmaps loss_fn over the leading batch axis; rng per example from its global index. Every
  models.dense layer folds the example axis into its rows (fold_example_axes: one matmul and
  one kernel-gradient dot for the whole batch instead of batched per-example dots), and every
  models.conv convolution runs once per example (XLA:CPU's convolution backward grows faster
  than its batch)."""
  b = jax.tree_util.tree_leaves(batch)[0].shape[0]
  first = jax.lax.axis_index(AXIS) * b
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(first + jnp.arange(b))

  def one(example, key):
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    return loss_fn(params, example, key, train)

  with fold_example_axes():
    return jax.vmap(one)(batch, keys)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: LossFn
               ) -> tuple[TrainState, dict]:
  """One optimisation step on a device's batch [B, ...]; returns (new state, metrics).

  `rng` is the run's base key; the step number is folded in here, so no rng is carried.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def mean_loss(params):
    losses, aux = _per_example(loss_fn, params, batch, step_rng, True)
    return jnp.mean(losses), aux

  (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  metrics = jax.tree_util.tree_map(jnp.mean, aux['metrics'])
  metrics['loss'] = loss
  metrics['grad_norm'] = optax.tree.norm(grads)  # global L2 norm (global_norm is deprecated)
  metrics = jax.lax.pmean(metrics, AXIS)
  return state.apply_gradients(grads=grads), metrics


def eval_step(params, batch: dict, rng: jax.Array, *, loss_fn: LossFn) -> dict:
  """Sums of per-example eval metrics over the valid examples of all devices.

  batch may carry `valid` bool [B] (padding of the last eval batch). Returns {name: sum} plus
  'count'; divide on the host after summing over batches.
  """
  valid = batch.pop('valid', None)
  losses, aux = _per_example(loss_fn, params, batch, rng, False)
  metrics = dict(aux['metrics'], loss=losses)
  weight = jnp.ones_like(losses) if valid is None else valid.astype(losses.dtype)

  def weighted_sum(v):  # v [B, ...]: per-example scalars or arrays (e.g. TP/FP/FN counts)
    w = weight.reshape((-1,) + (1,) * (v.ndim - 1))
    return jnp.sum(jnp.where(w > 0, v, 0.0) * w, axis=0)

  sums = {k: weighted_sum(v) for k, v in metrics.items()}
  sums['count'] = jnp.sum(weight)
  return jax.lax.psum(sums, AXIS)
