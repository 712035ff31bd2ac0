"""Test helpers shared by the test modules (imported as `from helpers import ...`)."""

from __future__ import annotations

import math
import os

from nsmae_jax.config import Config

# The tiny world every data test shares (3 scenes: 2 train + 1 val).
WORLD = dict(num_scenes=3, val_scenes=1, frames_per_scene=4, sweeps_per_frame=2,
             image_width=400, image_height=225, seed=0)


def tiny_config(tmp_dir: str = '', **overrides) -> Config:
  """The CPU test configuration (small images, few points, few rays)."""
  base = dict(image_height=32, image_width=88, patch_size=8, max_points=4096, max_boxes=32,
              bev_half_extent=32.0, bev_resolution=0.5, pillar_size=1.0, volume_stride=2,
              volume_z_cells=4, num_samples=16, perspective_rays=128, bev_rays=64,
              field_width=32, num_train_steps=4, per_device_batch_size=1, warmup_steps=1,
              log_every_steps=1, checkpoint_every_steps=2, eval_every_steps=0,
              image_every_steps=2, eval_batches=1, num_sweeps=2)
  if tmp_dir:
    base['workdir'] = os.path.join(tmp_dir, 'workdir')
  base.update(overrides)
  return Config().replace(**base)


def normal(shape, seed: int = 0):
  """Seeded N(0, 1) draws as a float32 jax array, from numpy: no compilation (an eager
  jax.random draw of a new shape compiles for up to ~1 s on XLA:CPU)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def flat_draw(sample, key, shape, **kwargs):
  """`sample(key, shape, **kwargs)` for a jax.random sampler (normal, uniform), drawn flat and
  reshaped: the same values (the partitionable threefry counts in the flat index), but XLA:CPU
  compiles a flat draw in a fraction of the time of a shaped one (about 0.2 s against 2-3 s
  for rank 5)."""
  return sample(key, (math.prod(shape),), **kwargs).reshape(shape)


def random_params(init, *args, seed: int = 0):
  """The tree `init(*args)` would return (shapes, dtypes from jax.eval_shape, nothing compiled)
  filled with seeded N(0, 0.1^2) draws: for tests whose claims hold for any weights."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype),
                      jax.eval_shape(init, *args))


def assert_matches_flax_module(ours, ref, params, x, g, names) -> dict:
  """ours and ref (a flax module) applied with the same `params` to x: outputs, input gradients
  and the gradients of the parameters `names` agree, for the loss sum(tanh(y) * g). Returns our
  parameter gradients."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  @jax.jit
  def both(params, x):
    loss = lambda m: lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)) * g)
    return [(m.apply(params, x), jax.grad(loss(m), argnums=(0, 1))(params, x))
            for m in (ours, ref)]

  (y, (dp, dx)), (y_ref, (dp_ref, dx_ref)) = both(params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  for k in names:
    np.testing.assert_allclose(dp['params'][k], dp_ref['params'][k], rtol=1e-4, atol=1e-4)
  return dp
