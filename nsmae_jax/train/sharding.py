"""The two data-parallel wrappers of the pure per-device steps: pmap, or jit over a Mesh.

Both run the same `train_step` / `eval_step` (steps.py) with `lax.pmean/psum` over the axis
'batch'. `Pmap` maps it over the local devices (the interface users asked for). `Jit` wraps it
in shard_map over a one-axis Mesh of all devices (every process), jitted: the batch is a global
array sharded over 'batch', params and optimiser state are replicated. Because the same function
sees the same per-device batch and `lax.axis_index` in both, the per-device rng keys and so the
losses and params agree to float rounding, and checkpoints (the unreplicated host state) move
between them.

Host batches stay [local_devices, per_device_batch, ...] from the pipeline in both paths.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsmae_jax.train.steps import AXIS, eval_step, train_step

CHOICES = ('pmap', 'jit')


class Pmap:
  """jax.pmap over the local devices; replicated trees carry a leading device axis."""

  def __init__(self, loss_fn):
    self.train = jax.pmap(functools.partial(train_step, loss_fn=loss_fn), axis_name=AXIS,
                          donate_argnums=(0,))
    self.eval = jax.pmap(functools.partial(eval_step, loss_fn=loss_fn), axis_name=AXIS)

  def replicate(self, tree: Any) -> Any:
    """Replicates onto the local devices with the sharding pmap outputs carry.

    flax's replicate() puts arrays on a differently named mesh than pmap's outputs; a pmapped
    function called with both (eval before and after training) would compile twice.
    """
    return jax.pmap(lambda x: x, axis_name=AXIS)(jax_utils.replicate(tree))

  def batch(self, host_batch: dict) -> dict:
    return host_batch

  def to_host(self, tree: Any) -> Any:
    """The first device's copy of a replicated tree, as numpy."""
    return jax.device_get(jax_utils.unreplicate(tree))


class Jit:
  """jax.jit of shard_map over a Mesh of all devices; replicated trees are global arrays."""

  def __init__(self, loss_fn, devices=None):
    self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P(AXIS))

    def wrap(step, donate):
      # check_vma=False keeps pmap's semantics: with it on, grad w.r.t. the replicated params
      # already sums over devices (the transpose of the implicit pvary), so the step's pmean
      # would see device-summed grads (2x on 2 devices: Adam hides most of it, grad_norm and
      # clipping do not). Outputs are pmean/psum results, the same on every device: P().
      mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                             out_specs=P(), check_vma=False)
      return jax.jit(mapped, donate_argnums=(0,) if donate else ())

    self.train = wrap(functools.partial(train_step, loss_fn=loss_fn), True)
    self.eval = wrap(functools.partial(eval_step, loss_fn=loss_fn), False)

  def replicate(self, tree: Any) -> Any:
    """Host (numpy or single-device) leaves -> global arrays replicated on every device.

    Built shard by shard so that it works across processes (each process places its own
    devices' copies; every process must pass the same values).
    """
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self._replicated, lambda index: x[index])
    return jax.tree_util.tree_map(put, tree)

  def batch(self, host_batch: dict) -> dict:
    """Host batch [local_devices, B, ...] -> global arrays [devices * B, ...] sharded on 'batch'.

    Local device i holds rows [i * B, (i + 1) * B) of this process's block, as under pmap.
    """
    def put(x):
      x = np.asarray(x)
      local = x.reshape((-1,) + x.shape[2:])
      global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
      return jax.make_array_from_process_local_data(self._sharded, local, global_shape)
    return {k: put(v) for k, v in host_batch.items()}

  def to_host(self, tree: Any) -> Any:
    """A replicated tree as numpy (this process's first copy; no cross-process gather)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def make(parallelism: str, loss_fn) -> Pmap | Jit:
  """The wrapper named by TrainConfig.parallelism."""
  if parallelism == 'pmap':
    return Pmap(loss_fn)
  if parallelism == 'jit':
    return Jit(loss_fn)
  raise ValueError(f'parallelism must be one of {CHOICES}, got {parallelism!r}')
