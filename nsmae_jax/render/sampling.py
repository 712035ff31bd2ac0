"""Samples along one ray (vmapped over rays) and trilinear interpolation of the fused volume."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stratified_samples(key: jax.Array | None, near: jnp.ndarray, far: jnp.ndarray,
                       num_samples: int, jitter: jnp.ndarray | None = None
                       ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Stratified sample distances for one ray.

  [near, far] is cut into `num_samples` equal bins; one sample per bin at a uniform random
  position (key given, training) or at the bin centre (key None, deterministic eval).

  Args:
    key: PRNGKey or None; near, far: [] scalars (m).
    jitter: [S] uniform [0, 1) positions within the bins, used instead of drawing from `key`
      (render_rays draws all rays' jitter in one call).

  Returns:
    t [S] sample distances, deltas [S] bin lengths (m).
  """
  width = (far - near) / num_samples
  if jitter is not None:
    offset = jitter
  elif key is not None:
    offset = jax.random.uniform(key, (num_samples,), dtype=jnp.result_type(near))
  else:
    offset = 0.5
  t = near + (jnp.arange(num_samples) + offset) * width
  return t, jnp.full((num_samples,), width)


def trilinear_interpolate(volume: jnp.ndarray, points: jnp.ndarray, box_min,
                          box_max) -> jnp.ndarray:
  """Trilinear interpolation of a cell-centred volume.

  Args:
    volume: [X, Y, Z, C] features; cell (i, j, k) is centred at box_min + (ijk + 0.5) * cell.
    points: [N, 3] LiDAR frame (m). Points outside the box take the clamped border value.
    box_min, box_max: 3-sequences, the volume's bounds (m).

  Returns:
    [N, C] interpolated features. Differentiable in the volume and the points.
  """
  starts, w = _block_corners(volume.shape[:3], points, box_min, box_max)
  # A size-1 axis is repeated once so that every point's 2 x 2 x 2 block fits; its second
  # layer gets weight 0 (f = 0 on that axis), and the repeat's gradient adds nothing.
  reps = [(0, 1 if n == 1 else 0) for n in volume.shape[:3]] + [(0, 0)]
  if any(r for _, r in reps):
    volume = jnp.pad(volume, reps, mode='edge')
  return _blend(volume, starts, w)


def _block_corners(shape, points: jnp.ndarray, box_min, box_max
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Each point's lower corner cell (i0, [N, 3] int32; its 2 x 2 x 2 block of cells starts
  there) and the block's trilinear weights ([N, 8], x-major, points' dtype; differentiable in
  the points). On a size-1 axis i0 = 0 and the block's second layer has weight 0."""
  size = jnp.array(shape)
  lo, hi = jnp.asarray(box_min, points.dtype), jnp.asarray(box_max, points.dtype)
  g = (points - lo) / (hi - lo) * size - 0.5                  # [N, 3] index coordinates
  g = jnp.clip(g, 0.0, size - 1.0)
  # i0 <= size - 2 so that f reaches 1 at the last centre and the block stays inside.
  i0 = jnp.clip(jnp.floor(g).astype(jnp.int32), 0, jnp.maximum(size - 2, 0))
  f = g - i0                                                   # [N, 3] in [0, 1]
  wx, wy, wz = (jnp.stack([1 - f[:, a], f[:, a]], -1) for a in range(3))
  w = (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)
  # Materialised once: XLA would otherwise fuse (recompute) the index and weight arithmetic into
  # every element of the gather and of the backward pass's updates.
  return jax.lax.optimization_barrier((i0, w))


# One gather (scatter) window per point: its 2 x 2 x 2 block of cells, all channels.
_BLOCK = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3, 4), collapsed_slice_dims=(),
                                        start_index_map=(0, 1, 2))
_BLOCK_UPDATE = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3, 4),
                                                inserted_window_dims=(),
                                                scatter_dims_to_operand_dims=(0, 1, 2))
_IN_BOUNDS = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _blocks(volume: jnp.ndarray, starts: jnp.ndarray) -> jnp.ndarray:
  """volume [X, Y, Z, C], starts [N, 3] (each <= size - 2) -> the blocks [N, 8, C]."""
  c = volume.shape[-1]
  return jax.lax.gather(volume, starts, _BLOCK, (2, 2, 2, c), mode=_IN_BOUNDS).reshape(-1, 8, c)


@jax.custom_vjp
def _blend(volume: jnp.ndarray, starts: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """sum_k w[:, k] block[:, k]: volume [X, Y, Z, C], starts [N, 3], w [N, 8] -> [N, C].

  One windowed gather of each point's 2 x 2 x 2 block (all channels) rather than 8 row
  gathers of 8 computed indices; the backward pass is one windowed scatter-add. Renderer of
  the demo config (torch twin's sizes), forward + backward, in-process A/B, 40 rounds, 2 cores
  of an AMD EPYC (AVX2): 112.9 -> 99.9 ms."""
  blocks = _blocks(volume, starts)
  wv = w.astype(volume.dtype)
  out = 0.0
  for k in range(8):
    out = out + wv[:, k:k + 1] * blocks[:, k]
  return out


def _blend_fwd(volume, starts, w):
  return _blend(volume, starts, w), (volume, starts, w)


def _blend_bwd(res, g):
  """One scatter-add of every block's contributions into the volume; the weights' cotangent
  (towards the points) is the block's features dotted with g, which XLA drops when nothing asks
  for gradients w.r.t. the points (the renderer's sample positions)."""
  volume, starts, w = res
  c = volume.shape[-1]
  gv = g.astype(volume.dtype)
  updates = (w.astype(volume.dtype)[:, :, None] * gv[:, None, :]).reshape(-1, 2, 2, 2, c)
  d_volume = jax.lax.scatter_add(jnp.zeros_like(volume), starts, updates, _BLOCK_UPDATE,
                                 mode=_IN_BOUNDS)
  blocks = _blocks(volume, starts)
  d_w = jnp.stack([jnp.sum(gv * blocks[:, k], axis=-1) for k in range(8)], -1)
  return d_volume, None, d_w.astype(w.dtype)


_blend.defvjp(_blend_fwd, _blend_bwd)


_EPS = 1e-6


def box_near_far(origins: jnp.ndarray, dirs: jnp.ndarray, box_min, box_max,
                 near: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Where rays enter and leave an axis-aligned box (slab test).

  Args:
    origins, dirs: [..., 3]; box_min, box_max: 3-sequences (m); near: minimum near bound.

  Returns:
    near [...], far [...], hit [...] bool (the ray spends positive length in the box beyond
    `near`). For rays that miss, far = near + 1e-3 so downstream sampling stays finite.
  """
  lo, hi = jnp.asarray(box_min, origins.dtype), jnp.asarray(box_max, origins.dtype)
  safe = jnp.where(jnp.abs(dirs) < _EPS, _EPS, dirs)
  t0, t1 = (lo - origins) / safe, (hi - origins) / safe
  t_enter = jnp.max(jnp.minimum(t0, t1), axis=-1)
  t_exit = jnp.min(jnp.maximum(t0, t1), axis=-1)
  n = jnp.maximum(t_enter, near)
  hit = t_exit > n + 1e-3
  f = jnp.where(hit, t_exit, n + 1e-3)
  return n, f, hit
