"""LiDAR-guided sample placement: an occupancy grid from the LiDAR returns and inverse-CDF samples.

Stratified sampling spends most of a ray's field evaluations in empty air: a ray through the
64 m volume meets one surface. The LiDAR returns say where surfaces can be, so each ray first
looks the occupancy grid up at M cheap coarse positions (no field MLP), turns that into a
piecewise-constant pdf over [near, far] with a uniform floor (rays through unscanned space and
surfaces the LiDAR missed still get samples), and places its S field samples by inverse CDF
(the importance pass of NeRF / mip-NeRF 360, with the LiDAR standing in for the coarse
network, as in UniPAD's depth-aware sampling).

Sample positions carry no gradient (stop_gradient), as in every NeRF importance pass: the loss
trains the field at the samples, not where they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_shape(box_min, box_max, cell: float) -> tuple[int, int, int]:
  """Cells per axis of an occupancy grid with (about) `cell` m cells over the box (>= 1)."""
  return tuple(max(1, int(round((hi - lo) / cell))) for lo, hi in zip(box_min, box_max))


def _cell_index(points: jnp.ndarray, box_min, box_max, size: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[N, 3] points -> (integer cell indices [N, 3] of a `size` grid over the box, inside [N])."""
  lo, hi = jnp.asarray(box_min, points.dtype), jnp.asarray(box_max, points.dtype)
  idx = jnp.floor((points - lo) / (hi - lo) * size).astype(jnp.int32)
  return idx, jnp.all((idx >= 0) & (idx < size), axis=-1)


def occupancy_grid(points: jnp.ndarray, valid: jnp.ndarray, box_min, box_max,
                   shape: tuple[int, int, int], dilation: int = 1) -> jnp.ndarray:
  """Marks the cells holding a LiDAR return, dilated by `dilation` cells.

  The dilation covers the coarse lookup's bin width and small sweep/motion offsets: a surface
  sample should not miss its return by falling one cell short.

  Args:
    points: [P, 3] LiDAR frame (m); valid: [P] bool (padding False); points outside the box
      are ignored.
    box_min, box_max: 3-sequences, the volume's bounds (m); shape: (X, Y, Z) cells.
    dilation: cells added on every side of an occupied cell (0 = none).

  Returns:
    [X, Y, Z] float32, 1 in occupied (or dilated) cells, else 0.
  """
  size = jnp.array(shape)
  idx, inside = _cell_index(points.astype(jnp.float32), box_min, box_max, size)
  inside = valid.astype(bool) & inside
  flat = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
  n = shape[0] * shape[1] * shape[2]
  # One scatter for all points; the points outside go to index n and are dropped.
  grid = jnp.zeros((n,), jnp.float32).at[jnp.where(inside, flat, n)].max(1.0, mode='drop')
  grid = grid.reshape(shape)
  if dilation:
    w = 2 * dilation + 1
    grid = jax.lax.reduce_window(grid, 0.0, jax.lax.max, (w, w, w), (1, 1, 1), 'SAME')
  return grid


def occupancy_lookup(grid: jnp.ndarray, points: jnp.ndarray, box_min, box_max) -> jnp.ndarray:
  """Nearest-cell occupancy of [N, 3] points (LiDAR frame) in grid [X, Y, Z] -> [N]; points
  outside the box read 0."""
  size = jnp.array(grid.shape)
  idx, inside = _cell_index(points, box_min, box_max, size)
  idx = jnp.clip(idx, 0, size - 1)
  return jnp.where(inside, grid[idx[:, 0], idx[:, 1], idx[:, 2]], 0.0)


def inverse_cdf_samples(occupancy: jnp.ndarray, near: jnp.ndarray, far: jnp.ndarray,
                        num_samples: int, uniform_fraction: float,
                        jitter: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """S sorted samples of one ray from the occupancy at its M coarse bins.

  pdf = (1 - a) occupancy / sum(occupancy) + a / M with a = uniform_fraction (a = 1 when the
  ray sees no occupied bin: plain uniform). The S quantiles (i + jitter_i) / S (jitter 0.5 in
  eval) are pushed through the inverse CDF, so the samples come out sorted and, with jitter,
  are stratified in probability.

  Args:
    occupancy: [M] occupancy of M equal bins over [near, far]; near, far: [] (m).
    jitter: [S] uniform [0, 1) or None (deterministic quantile centres).

  Returns:
    t [S] sorted distances in [near, far]; deltas [S] the intervals the samples stand for:
    boundaries halfway between neighbours, near and far at the ends (they sum to far - near,
    so the compositing quadrature integrates the same ray as stratified sampling).
  """
  m = occupancy.shape[-1]
  occupancy = jax.lax.stop_gradient(occupancy)
  total = jnp.sum(occupancy)
  a = jnp.where(total > 0, uniform_fraction, 1.0)
  pdf = (1.0 - a) * occupancy / jnp.maximum(total, 1e-12) + a / m           # [M], sums to 1
  cdf = jnp.concatenate([jnp.zeros((1,), pdf.dtype), jnp.cumsum(pdf)])        # [M + 1]
  cdf = cdf / cdf[-1]
  offset = 0.5 if jitter is None else jitter
  u = (jnp.arange(num_samples, dtype=pdf.dtype) + offset) / num_samples      # [S] in (0, 1)
  bin_ = jnp.clip(jnp.searchsorted(cdf, u, side='right') - 1, 0, m - 1)
  frac = jnp.clip((u - cdf[bin_]) / jnp.maximum(pdf[bin_], 1e-12), 0.0, 1.0)
  near, far = jax.lax.stop_gradient(near), jax.lax.stop_gradient(far)
  t = near + (bin_ + frac) * (far - near) / m
  edges = jnp.concatenate([near[None], 0.5 * (t[1:] + t[:-1]), far[None]])
  return t, jnp.diff(edges)


def guided_samples(occupancy: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
                   near: jnp.ndarray, far: jnp.ndarray, num_samples: int, coarse_samples: int,
                   uniform_fraction: float, box_min, box_max,
                   jitter: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sample distances of R rays through each of B examples' occupancy grids.

  Args:
    occupancy: [B, X, Y, Z] (occupancy_grid per example), bounds box_min/box_max.
    origins, dirs: [B, R, 3] LiDAR frame; near, far: [B, R] (m).
    num_samples: S (field evaluations per ray); coarse_samples: M (grid lookups per ray).
    jitter: [B, R, S] uniform [0, 1) (training) or None (eval).

  Returns:
    t, deltas [B, R, S] (no gradient).
  """
  b, r = origins.shape[:2]
  tc = (jnp.arange(coarse_samples, dtype=near.dtype) + 0.5) / coarse_samples   # [M]
  tc = near[..., None] + tc * (far - near)[..., None]                           # [B, R, M]
  points = origins[:, :, None, :] + tc[..., None] * dirs[:, :, None, :]         # [B, R, M, 3]
  occ = jax.vmap(lambda g, p: occupancy_lookup(g, p, box_min, box_max))(
      occupancy, points.reshape(b, -1, 3)).reshape(b, r, coarse_samples)
  per_ray = lambda o, n, f, j: inverse_cdf_samples(o, n, f, num_samples, uniform_fraction, j)
  if jitter is None:
    fn = jax.vmap(jax.vmap(lambda o, n, f: per_ray(o, n, f, None)))
    t, deltas = fn(occ, near, far)
  else:
    t, deltas = jax.vmap(jax.vmap(per_ray))(occ, near, far, jitter)
  return jax.lax.stop_gradient(t), jax.lax.stop_gradient(deltas)
