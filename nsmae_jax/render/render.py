"""`render_rays`: sample, interpolate, evaluate the field, composite; vmapped over rays."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.render.compositing import composite
from nsmae_jax.render.sampling import stratified_samples, trilinear_interpolate

FieldFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def sample_ray(volume: jnp.ndarray, origin: jnp.ndarray, direction: jnp.ndarray,
               near: jnp.ndarray, far: jnp.ndarray, jitter: jnp.ndarray | None, num_samples: int,
               box_min, box_max) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """One ray: origin, direction [3], near, far [], jitter [S] or None (bin centres) -> t,
  deltas [S], points [S, 3], volume features at the points [S, C]."""
  t, deltas = stratified_samples(None, near, far, num_samples, jitter)
  points = origin + t[:, None] * direction
  return t, deltas, points, trilinear_interpolate(volume, points, box_min, box_max)


def render_rays(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
                near: jnp.ndarray, far: jnp.ndarray, num_samples: int, box_min, box_max,
                key: jax.Array | None = None,
                background: jnp.ndarray | None = None,
                remat: bool = False) -> dict[str, jnp.ndarray]:
  """Renders R rays through each of B fused volumes.

  Args:
    field_fn: (features [N, C], points [N, 3], dirs [N, 3]) -> (density [N], colour [N, 3]);
      applied once on all B * R * S samples (one large matmul rather than many small ones).
    volume: [B, X, Y, Z, C] fused features, LiDAR frame, bounds box_min/box_max.
    origins, dirs: [B, R, 3] LiDAR frame, unit dirs; near, far: [B, R] (m).
    num_samples: S.
    key: PRNGKey for stratified jitter, None for deterministic bin centres (eval).
    background: [3] colour behind the volume (composite()); None = black.
    remat: rematerialise the samples (interpolated features, field activations) in the backward
      pass instead of keeping them from the forward pass (nn.remat when field_fn is a flax
      module, jax.checkpoint otherwise); same outputs and gradients, less memory.

  Returns:
    composite() outputs with leading [B, R] plus t [B, R, S].
  """
  b, r = origins.shape[:2]
  # One draw for every ray's jitter: per-ray keys would cost a threefry split per ray.
  jitter = (None if key is None else
            jax.random.uniform(key, (b, r, num_samples), dtype=origins.dtype))

  def samples(fn, *arrays):  # (field, volume, origins, dirs, near, far, jitter)
    return _evaluate_samples(fn, *arrays, num_samples, box_min, box_max)

  evaluate = samples
  if remat and isinstance(field_fn, nn.Module):  # a flax module's params need the lifted form
    evaluate = nn.remat(samples)
  elif remat:
    evaluate = lambda fn, *arrays: jax.checkpoint(functools.partial(samples, fn))(*arrays)
  t, deltas, density, color = evaluate(field_fn, volume, origins, dirs, near, far, jitter)
  out = composite(density, color, t, deltas, far, background)
  out['t'] = t
  return out


def _evaluate_samples(field_fn: FieldFn, volume: jnp.ndarray, origins: jnp.ndarray,
                      dirs: jnp.ndarray, near: jnp.ndarray, far: jnp.ndarray,
                      jitter: jnp.ndarray | None, num_samples: int, box_min, box_max
                      ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Samples every ray, interpolates the volume there and evaluates the field: t, deltas,
  density [B, R, S] and colour [B, R, S, 3] (float32)."""
  b, r = origins.shape[:2]
  per_ray = lambda v, o, d, n, f, k: sample_ray(v, o, d, n, f, k, num_samples, box_min, box_max)
  if jitter is None:
    rays_fn = jax.vmap(lambda v, o, d, n, f: per_ray(v, o, d, n, f, None),
                       in_axes=(None, 0, 0, 0, 0))
    t, deltas, points, feats = jax.vmap(rays_fn)(volume, origins, dirs, near, far)
  else:
    rays_fn = jax.vmap(per_ray, in_axes=(None, 0, 0, 0, 0, 0))
    t, deltas, points, feats = jax.vmap(rays_fn)(volume, origins, dirs, near, far, jitter)
  c = feats.shape[-1]
  density, color = field_fn(feats.reshape(-1, c), points.reshape(-1, 3),
                            jnp.broadcast_to(dirs[:, :, None, :], points.shape).reshape(-1, 3))
  density = density.reshape(b, r, num_samples).astype(jnp.float32)
  color = color.reshape(b, r, num_samples, 3).astype(jnp.float32)
  return t, deltas, density, color
