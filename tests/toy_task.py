"""A tiny model behind the Task interface, to test the training loop without the real network."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.train.task import Task


class Toy(nn.Module):
  """Predicts the per-camera mean colour from a coarse view of the images."""
  width: int = 16  # hidden units (a wide toy makes checkpoints of a few MB: disk-full tests)

  @nn.compact
  def __call__(self, batch, rng=None):
    x = batch['images'][:, :, ::8, ::8].reshape(batch['images'].shape[0], 6, -1)
    if rng is not None:  # a random "mask", so rng handling is part of what is tested
      x = x * jax.random.bernoulli(rng, 0.5, x.shape)
    return nn.Dense(3)(nn.relu(nn.Dense(self.width)(x)))


def toy_task(nan_after_step: int | None = None, width: int = 16) -> Task:
  model = Toy(width=width)

  def init_params(rng, batch):
    return model.init(rng, batch)['params']

  def loss_fn(params, batch, rng, train):
    pred = model.apply({'params': params}, batch, rng if train else None)
    target = batch['images'].mean(axis=(2, 3))
    loss = jnp.mean((pred - target) ** 2)
    if nan_after_step is not None:
      loss = loss * jnp.where(jnp.sum(params['Dense_1']['bias']) != 0, jnp.nan, 1.0) \
          if nan_after_step == 0 else loss
    return loss, {'metrics': {'mse': loss}}

  return Task(name='toy', model=model, init_params=init_params, loss_fn=loss_fn)
