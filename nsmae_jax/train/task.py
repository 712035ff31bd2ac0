"""What the generic training loop needs to know about a model: a Task.

Pre-training and fine-tuning share one loop (loop.py); each provides a Task: how to build the
model and initialise (or restore) its params, the per-example loss, how to summarise summed eval
statistics, which images to draw, which data to read and which metrics head the progress bar.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np


Params = Any


def mean_summary(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Eval sums -> means over the counted examples (scalar metrics only)."""
  count = max(float(sums['count']), 1.0)
  return {k: float(v) / count for k, v in sums.items() if k != 'count' and np.ndim(v) == 0}


@dataclasses.dataclass
class Task:
  """A trainable model: see module docstring. All callables are pure except `prepare_params`."""
  name: str  # shown in the progress bar
  model: Any  # the flax module (for callers: notebooks, benchmarks); the loop uses the callables
  # (rng, example batch [B, ...]) -> params
  init_params: Callable[[jax.Array, dict], Params]
  # (params, batch [1, ...], rng, train) -> (loss, {'metrics': {name: scalar or array}})
  loss_fn: Callable[[Params, dict, jax.Array, bool], tuple[jax.Array, dict]]
  # (params, batch [B, ...], rng) -> {name: image [H, W] or [H, W, 3] in [0, 1]}
  render_images: Callable[[Params, dict, jax.Array], dict] | None = None
  # summed eval statistics (incl. 'count') -> scalar metrics
  eval_summary: Callable[[Mapping[str, np.ndarray]], dict] = mean_summary
  # fresh params -> params used at step 0 (e.g. restore a pre-trained encoder); not on resume
  prepare_params: Callable[[Params], Params] = lambda p: p
  # keyword arguments for nsmae_jax.data.pipeline.make_train_iterator (e.g. label_fraction)
  train_data_kwargs: dict = dataclasses.field(default_factory=dict)
  # metric names shown in the progress bar: from the train logs and, as eval_<name>, the evals
  headline: tuple[str, ...] = ('loss',)
  # params -> prefix tree of learning-rate multipliers (nsmae_jax.train.optim); None = all 1
  lr_scales: Callable[[Params], Any] | None = None
