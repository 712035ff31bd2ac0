"""`render_rays`: sample, interpolate, evaluate the field, composite; vmapped over rays."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.render.compositing import composite
from nsmae_jax.render.guidance import guided_samples
from nsmae_jax.render.sampling import stratified_samples, trilinear_interpolate

FieldFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def render_rays(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
                near: jnp.ndarray, far: jnp.ndarray, num_samples: int, box_min, box_max,
                key: jax.Array | None = None,
                background: jnp.ndarray | None = None,
                remat: bool = False, occupancy: jnp.ndarray | None = None,
                coarse_samples: int = 128, uniform_fraction: float = 0.2,
                free_space_carving: bool = False) -> dict[str, jnp.ndarray]:
  """Renders R rays through each of B fused volumes.

  Args:
    field_fn: (features [N, S, C], points [N, S, 3], dirs [N, 1, 3]) -> (density [N, S],
      colour [N, S, 3]), N = B * R rays of S samples, one view direction per ray (broadcast
      over its samples); applied once on all samples (one large matmul rather than many).
    volume: [B, X, Y, Z, C] fused features, LiDAR frame, bounds box_min/box_max.
    origins, dirs: [B, R, 3] LiDAR frame, unit dirs; near, far: [B, R] (m).
    num_samples: S.
    key: PRNGKey for stratified jitter, None for deterministic bin centres (eval).
    background: [3] colour behind the volume (composite()); None = black.
    remat: rematerialise the samples (interpolated features, field activations) in the backward
      pass instead of keeping them from the forward pass (nn.remat when field_fn is a flax
      module, jax.checkpoint otherwise); same outputs and gradients, less memory.
    occupancy: [B, Gx, Gy, Gz] LiDAR occupancy grids over box_min/box_max
      (guidance.occupancy_grid): None = stratified samples; else LiDAR-guided samples
      (guidance.guided_samples with coarse_samples lookups per ray and uniform_fraction of the
      pdf spread evenly), the field evaluated only there.
    free_space_carving: occupancy holds three-state grids (guidance.carved_occupancy_grid) and
      the uniform share skips the cells seen free.

  Returns:
    composite() outputs with leading [B, R] plus t [B, R, S].
  """
  b, r = origins.shape[:2]
  # One draw for every ray's jitter: per-ray keys would cost a threefry split per ray.
  jitter = (None if key is None else
            jax.random.uniform(key, (b, r, num_samples), dtype=origins.dtype))

  if occupancy is None:
    def samples(fn, *arrays):  # (field, volume, origins, dirs, near, far, jitter)
      return _evaluate_samples(fn, *arrays, num_samples, box_min, box_max)
  else:
    # Placement needs no field and no gradient, so it stays outside the rematerialised part.
    t_guided, deltas_guided = guided_samples(occupancy, origins, dirs, near, far, num_samples,
                                             coarse_samples, uniform_fraction, box_min,
                                             box_max, jitter, free_space_carving)

    def samples(fn, volume, origins, dirs, t, deltas, unused):
      del unused
      return (t, deltas) + _evaluate_at(fn, volume, origins, dirs, t, box_min, box_max)

  arrays = ((near, far, jitter) if occupancy is None else (t_guided, deltas_guided, None))
  evaluate = samples
  if remat and isinstance(field_fn, nn.Module):  # a flax module's params need the lifted form
    evaluate = nn.remat(samples)
  elif remat:
    evaluate = lambda fn, *arrays: jax.checkpoint(functools.partial(samples, fn))(*arrays)
  t, deltas, density, color = evaluate(field_fn, volume, origins, dirs, *arrays)
  out = composite(density, color, t, deltas, far, background)
  out['t'] = t
  return out


def render_at(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
              t: jnp.ndarray, deltas: jnp.ndarray, far: jnp.ndarray, box_min, box_max,
              background: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Renders R rays through each of B volumes at given samples: t, deltas [B, R, S] (each
  sample's distance and the interval it stands for; e.g. from a proposal pass or
  guidance.inverse_cdf_samples), far [B, R]. The field is evaluated at those S samples only;
  -> composite() outputs with leading [B, R] plus t. No remat, no jitter: for analysis and
  eval (experiments.sampling_study); training goes through render_rays."""
  density, color = _evaluate_at(field_fn, volume, origins, dirs, t, box_min, box_max)
  out = composite(density, color, t, deltas, far, background)
  out['t'] = t
  return out


def _evaluate_samples(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray,
                      dirs: jnp.ndarray, near: jnp.ndarray, far: jnp.ndarray,
                      jitter: jnp.ndarray | None, num_samples: int, box_min, box_max
                      ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Samples every ray (stratified), interpolates the volume there and evaluates the field: t,
  deltas, density [B, R, S] and colour [B, R, S, 3] (float32)."""
  if jitter is None:
    draw = lambda n, f: stratified_samples(None, n, f, num_samples)
    t, deltas = jax.vmap(jax.vmap(draw))(near, far)
  else:
    draw = lambda n, f, k: stratified_samples(None, n, f, num_samples, k)
    t, deltas = jax.vmap(jax.vmap(draw))(near, far, jitter)
  return (t, deltas) + _evaluate_at(field_fn, volume, origins, dirs, t, box_min, box_max)


def _evaluate_at(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray,
                 dirs: jnp.ndarray, t: jnp.ndarray, box_min, box_max
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The field at given sample distances t [B, R, S]: density [B, R, S], colour
  [B, R, S, 3] (float32). One volume lookup per example over all its samples (vmapped over the
  batch only: a lookup vmapped over rays of one shared volume would batch its gradient too)."""
  points = origins[:, :, None, :] + t[..., None] * dirs[:, :, None, :]        # [B, R, S, 3]
  b, r, s = t.shape
  feats = jax.vmap(lambda v, p: trilinear_interpolate(v, p, box_min, box_max))(
      volume, points.reshape(b, r * s, 3)).reshape(b, r, s, -1)
  return _field(field_fn, feats, points, dirs)


def _field(field_fn: FieldFn, feats: jnp.ndarray, points: jnp.ndarray, dirs: jnp.ndarray
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One field call on all samples: feats [B, R, S, C], points [B, R, S, 3], dirs [B, R, 3]
  -> density [B, R, S], colour [B, R, S, 3] (float32). The field gets [B R, S, .] samples and
  one direction per ray [B R, 1, 3] (broadcast over the samples)."""
  b, r, s, c = feats.shape
  density, color = field_fn(feats.reshape(b * r, s, c), points.reshape(b * r, s, 3),
                            dirs.reshape(b * r, 1, 3))
  return (density.reshape(b, r, s).astype(jnp.float32),
          color.reshape(b, r, s, 3).astype(jnp.float32))
