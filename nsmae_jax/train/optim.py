"""Optimiser: AdamW with linear warmup + cosine decay and global-norm gradient clipping."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from nsmae_jax.config import TrainConfig


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0."""
  warmup = min(train.warmup_steps, max(train.num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
      decay_steps=max(train.num_train_steps, warmup + 1), end_value=0.0)


def scale_updates(lr_scales: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies the updates by lr_scales(params): a prefix tree of per-subtree learning-rate
  multipliers (weight decay included, so a 0 subtree stays exactly where it is)."""

  def update_fn(updates, state, params=None):
    scales = lr_scales(updates if params is None else params)
    return jax.tree_util.tree_map(
        lambda s, sub: jax.tree_util.tree_map(lambda u: u * s, sub), scales, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(train: TrainConfig, lr_scales: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on >=2-d weights only) behind optional gradient clipping.

  lr_scales: params -> a prefix tree of learning-rate multipliers (e.g. {'backbone': 0.1,
  'head': 1.0}); None = 1 everywhere.
  """
  schedule = learning_rate_schedule(train)

  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  parts = []
  if train.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=train.weight_decay,
                           mask=decay_mask))
  if lr_scales is not None:
    parts.append(scale_updates(lr_scales))
  return optax.chain(*parts)
