"""LiDAR-guided sample placement: an occupancy grid from the LiDAR returns and inverse-CDF samples.

Stratified sampling spends most of a ray's field evaluations in empty air: a ray through the
64 m volume meets one surface. The LiDAR returns say where surfaces can be, so each ray first
looks the occupancy grid up at M cheap coarse positions (no field MLP), turns that into a
piecewise-constant pdf over [near, far] with a uniform floor (rays through unscanned space and
surfaces the LiDAR missed still get samples), and places its S field samples by inverse CDF
(the importance pass of NeRF / mip-NeRF 360, with the LiDAR standing in for the coarse
network, as in UniPAD's depth-aware sampling).

With free-space carving (--free_space_carving) the grid has three states: occupied (a return
in the cell), free (a LiDAR ray passed through the cell on its way to its return) and unknown
(neither); the uniform floor then goes to the occupied and unknown bins only, not to space the
LiDAR has seen to be empty.

Sample positions carry no gradient (stop_gradient), as in every NeRF importance pass: the loss
trains the field at the samples, not where they are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nsmae_jax.render.sampling import box_near_far

# Value of the cells that are neither occupied (1) nor seen free (0) in a carved grid.
UNKNOWN = 0.5


def grid_shape(box_min, box_max, cell: float) -> tuple[int, int, int]:
  """Cells per axis of an occupancy grid with (about) `cell` m cells over the box (>= 1)."""
  return tuple(max(1, int(round((hi - lo) / cell))) for lo, hi in zip(box_min, box_max))


def _cell_index(points: jnp.ndarray, box_min, box_max, size: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[N, 3] points -> (integer cell indices [N, 3] of a `size` grid over the box, inside [N])."""
  lo, hi = jnp.asarray(box_min, points.dtype), jnp.asarray(box_max, points.dtype)
  idx = jnp.floor((points - lo) / (hi - lo) * size).astype(jnp.int32)
  return idx, jnp.all((idx >= 0) & (idx < size), axis=-1)


def _mark_cells(flat_grid: jnp.ndarray, points: jnp.ndarray, keep: jnp.ndarray, box_min,
                box_max, shape: tuple[int, int, int]) -> jnp.ndarray:
  """Sets to 1 the cells of a flat [X * Y * Z] grid that hold one of the [N, 3] points with
  keep [N] True, in one scatter-max (points outside the box go to index n and are dropped)."""
  idx, inside = _cell_index(points, box_min, box_max, jnp.array(shape))
  flat = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
  n = flat_grid.shape[0]
  return flat_grid.at[jnp.where(keep & inside, flat, n)].max(1.0, mode='drop')


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
  n = shape[0] * shape[1] * shape[2]
  grid = _mark_cells(jnp.zeros((n,), jnp.float32), points.astype(jnp.float32),
                     valid.astype(bool), box_min, box_max, shape).reshape(shape)
  if dilation:
    w = 2 * dilation + 1
    grid = jax.lax.reduce_window(grid, 0.0, jax.lax.max, (w, w, w), (1, 1, 1), 'SAME')
  return grid


def carving_steps(box_min, box_max, shape: tuple[int, int, int]) -> int:
  """Points K that free_space_grid places along each LiDAR ray's in-box segment.

  The segment runs from where the ray from the sensor (the origin) enters the box to one cell
  short of its return, so it is at most as long as the farthest box corner from the origin
  (the box diagonal when the origin is outside the box). K spaces the points at most half the
  smallest cell edge apart on the longest such segment: every cell the segment crosses for at
  least half a cell holds a point (only corner slivers can be missed).
  """
  lo, hi = [float(x) for x in box_min], [float(x) for x in box_max]
  if all(a <= 0.0 <= b for a, b in zip(lo, hi)):
    length = math.sqrt(sum(max(-a, b) ** 2 for a, b in zip(lo, hi)))
  else:
    length = math.sqrt(sum((b - a) ** 2 for a, b in zip(lo, hi)))
  step = 0.5 * min((b - a) / n for a, b, n in zip(lo, hi, shape))
  return int(math.ceil(length / step)) + 1


def free_space_grid(points: jnp.ndarray, valid: jnp.ndarray, box_min, box_max,
                    shape: tuple[int, int, int], margin: float | None = None,
                    chunk: int = 1 << 20) -> jnp.ndarray:
  """Marks the cells LiDAR rays pass through on their way from the sensor to their returns.

  Each valid return's segment from the sensor (the LiDAR frame's origin) to `margin` short of
  the return, clipped to the box (a return outside the box still carves the part of its ray
  inside), gets K = carving_steps() evenly spaced points; every cell holding one is marked
  seen free. The returns' own cells are not excluded here: carved_occupancy_grid lets
  occupied cells win.

  Cost: P * K points, each a cell index and a scatter-max update (K = 183 for the 0.5 m cells
  of a 64 x 64 x 6 m box, so 0.75 M for P = 4096 returns, 6.2 M for P = 34k). They are made and
  scattered in chunks of about `chunk` points (a lax.scan over groups of steps, the grid as the
  carry): one scatter when P * K <= chunk, so the temporaries (coordinates, indices, masks: some
  tens of bytes a point) scale with chunk (x the batch under vmap), not with P * K.

  Args:
    points: [P, 3] LiDAR frame (m); valid: [P] bool (padding False).
    box_min, box_max: 3-sequences, the volume's bounds (m); shape: (X, Y, Z) cells.
    margin: how far short of the return the segment stops (m); None = the largest cell edge
      (the return's own cell and, mostly, the one in front of it are not carved).
    chunk: points per scatter (bounds the memory, see above).

  Returns:
    [X, Y, Z] float32, 1 in cells a ray passed through, else 0.
  """
  points = points.astype(jnp.float32)
  if margin is None:
    margin = max((float(b) - float(a)) / n for a, b, n in zip(box_min, box_max, shape))
  k = carving_steps(box_min, box_max, shape)
  p = points.shape[0]
  per_chunk = max(1, min(k, chunk // max(p, 1)))
  num_chunks = -(-k // per_chunk)
  # Fractions 0..1 of the segment; the tail pads the last chunk by repeating 1 (the max-scatter
  # of a repeated point changes nothing).
  fractions = jnp.minimum(jnp.arange(num_chunks * per_chunk, dtype=jnp.float32) / (k - 1), 1.0)
  fractions = fractions.reshape(num_chunks, per_chunk)

  dist = jnp.linalg.norm(points, axis=-1)                                  # [P]
  dirs = points / jnp.maximum(dist, 1e-6)[:, None]
  start, end, hit = box_near_far(jnp.zeros_like(points), dirs, box_min, box_max, 0.0)
  end = jnp.minimum(end, dist - margin)
  ok = valid.astype(bool) & hit & (end > start)                           # [P]
  n = shape[0] * shape[1] * shape[2]

  def carve(grid, frac):                                                   # frac [per_chunk]
    t = start[:, None] + frac[None, :] * (end - start)[:, None]            # [P, per_chunk]
    return _mark_cells(grid, (t[..., None] * dirs[:, None, :]).reshape(-1, 3),
                       jnp.repeat(ok, frac.shape[0]), box_min, box_max, shape), None

  if num_chunks == 1:
    grid, _ = carve(jnp.zeros((n,), jnp.float32), fractions[0])
  else:
    grid, _ = jax.lax.scan(carve, jnp.zeros((n,), jnp.float32), fractions)
  return grid.reshape(shape)


def carved_occupancy_grid(points: jnp.ndarray, valid: jnp.ndarray, box_min, box_max,
                          shape: tuple[int, int, int], dilation: int = 1,
                          margin: float | None = None, chunk: int = 1 << 20) -> jnp.ndarray:
  """The three-state grid of free-space carving: occupied 1, unknown UNKNOWN, free 0.

  Occupied: occupancy_grid (the returns' cells, dilated by `dilation`); free: cells a LiDAR ray
  passed through (free_space_grid, see there for margin, chunk and the cost) that are not
  occupied (occupied wins); unknown: the rest (behind surfaces, outside the scan, above it).

  Returns:
    [X, Y, Z] float32 in {0, UNKNOWN, 1}.
  """
  occupied = occupancy_grid(points, valid, box_min, box_max, shape, dilation)
  free = free_space_grid(points, valid, box_min, box_max, shape, margin, chunk)
  return jnp.where(occupied > 0, 1.0, jnp.where(free > 0, 0.0, UNKNOWN))


def occupancy_lookup(grid: jnp.ndarray, points: jnp.ndarray, box_min, box_max,
                     outside: float = 0.0) -> jnp.ndarray:
  """Nearest-cell occupancy of [N, 3] points (LiDAR frame) in grid [X, Y, Z] -> [N]; points
  outside the box read `outside`."""
  size = jnp.array(grid.shape)
  idx, inside = _cell_index(points, box_min, box_max, size)
  idx = jnp.clip(idx, 0, size - 1)
  return jnp.where(inside, grid[idx[:, 0], idx[:, 1], idx[:, 2]], outside)


def inverse_cdf_samples(occupancy: jnp.ndarray, near: jnp.ndarray, far: jnp.ndarray,
                        num_samples: int, uniform_fraction: float,
                        jitter: jnp.ndarray | None = None,
                        carving: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """S sorted samples of one ray from the occupancy at its M coarse bins.

  pdf = (1 - a) occupancy / sum(occupancy) + a / M with a = uniform_fraction (a = 1 when the
  ray sees no occupied bin: plain uniform). With carving (a carved_occupancy_grid's 1 /
  UNKNOWN / 0): pdf = (1 - a) occupied / sum(occupied) + a notfree / sum(notfree), notfree =
  the occupied and unknown bins, so no floor goes to seen-free space (a = 1 when no bin is
  occupied; plain uniform when every bin is free). The S quantiles (i + jitter_i) / S (jitter
  0.5 in eval) are pushed through the inverse CDF, so the samples come out sorted and, with
  jitter, are stratified in probability.

  Args:
    occupancy: [M] occupancy of M equal bins over [near, far]; near, far: [] (m).
    jitter: [S] uniform [0, 1) or None (deterministic quantile centres).
    carving: occupancy is three-state (carved_occupancy_grid), else binary (occupancy_grid).

  Returns:
    t [S] sorted distances in [near, far]; deltas [S] the intervals the samples stand for:
    boundaries halfway between neighbours, near and far at the ends (they sum to far - near,
    so the compositing quadrature integrates the same ray as stratified sampling).
  """
  m = occupancy.shape[-1]
  occupancy = jax.lax.stop_gradient(occupancy)
  if carving:
    occupied = (occupancy >= 1.0).astype(occupancy.dtype)
    notfree = (occupancy > 0.0).astype(occupancy.dtype)
    total, total_notfree = jnp.sum(occupied), jnp.sum(notfree)
    a = jnp.where(total > 0, uniform_fraction, 1.0)
    floor = jnp.where(total_notfree > 0, notfree / jnp.maximum(total_notfree, 1.0), 1.0 / m)
    pdf = (1.0 - a) * occupied / jnp.maximum(total, 1.0) + a * floor        # [M], sums to 1
  else:
    total = jnp.sum(occupancy)
    a = jnp.where(total > 0, uniform_fraction, 1.0)
    pdf = (1.0 - a) * occupancy / jnp.maximum(total, 1e-12) + a / m         # [M], sums to 1
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
                   jitter: jnp.ndarray | None = None,
                   carving: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sample distances of R rays through each of B examples' occupancy grids.

  Args:
    occupancy: [B, X, Y, Z] (occupancy_grid per example, or carved_occupancy_grid with
      carving), bounds box_min/box_max.
    origins, dirs: [B, R, 3] LiDAR frame; near, far: [B, R] (m).
    num_samples: S (field evaluations per ray); coarse_samples: M (grid lookups per ray).
    jitter: [B, R, S] uniform [0, 1) (training) or None (eval).
    carving: the grids are three-state (inverse_cdf_samples); coarse points outside the box
      then read unknown, not free.

  Returns:
    t, deltas [B, R, S] (no gradient).
  """
  b, r = origins.shape[:2]
  tc = (jnp.arange(coarse_samples, dtype=near.dtype) + 0.5) / coarse_samples   # [M]
  tc = near[..., None] + tc * (far - near)[..., None]                           # [B, R, M]
  points = origins[:, :, None, :] + tc[..., None] * dirs[:, :, None, :]         # [B, R, M, 3]
  outside = UNKNOWN if carving else 0.0
  occ = jax.vmap(lambda g, p: occupancy_lookup(g, p, box_min, box_max, outside))(
      occupancy, points.reshape(b, -1, 3)).reshape(b, r, coarse_samples)
  per_ray = lambda o, n, f, j: inverse_cdf_samples(o, n, f, num_samples, uniform_fraction, j,
                                                   carving)
  if jitter is None:
    fn = jax.vmap(jax.vmap(lambda o, n, f: per_ray(o, n, f, None)))
    t, deltas = fn(occ, near, far)
  else:
    t, deltas = jax.vmap(jax.vmap(per_ray))(occ, near, far, jitter)
  return jax.lax.stop_gradient(t), jax.lax.stop_gradient(deltas)
