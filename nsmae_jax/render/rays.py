"""Camera geometry and ray generation, all in the key frame's LiDAR frame (x right, y forward,
z up, metres).

Pixel convention: pixel (row r, col c) covers [c, c+1) x [r, r+1) of the continuous image plane,
so its centre is (u, v) = (c + 0.5, r + 0.5) and a projected point (u, v) (as the devkit's
`view_points` returns it) falls in pixel (floor(v), floor(u)).
"""

from __future__ import annotations

import jax.numpy as jnp

_EPS = 1e-6


def project_points(points: jnp.ndarray, intrinsics: jnp.ndarray, cam2lidar: jnp.ndarray,
                   min_depth: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Projects LiDAR-frame points into one camera (as nuscenes-devkit's view_points does).

  Args:
    points: [..., 3] LiDAR frame.
    intrinsics: [3, 3] for the stored image size.
    cam2lidar: [4, 4] camera -> LiDAR transform.
    min_depth: points closer than this along the optical axis are not in front.

  Returns:
    uv [..., 2] continuous pixel coordinates (u right, v down), depth [...] along the optical
    axis (m), in_front [...] bool (depth > min_depth).
  """
  rot, trans = cam2lidar[:3, :3], cam2lidar[:3, 3]
  # lidar2cam = inverse of a rigid transform: R^T (p - t).
  p_cam = (points - trans) @ rot                               # [..., 3]
  depth = p_cam[..., 2]
  safe = jnp.where(depth > _EPS, depth, 1.0)
  pix = p_cam @ intrinsics.T                                   # [..., 3]
  uv = pix[..., :2] / safe[..., None]
  return uv, depth, depth > min_depth


def in_image(uv: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[..., 2] -> [...] bool: inside the image plane [0, W) x [0, H)."""
  return (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height)


def pixel_centers(height: int, width: int) -> jnp.ndarray:
  """[H, W, 2] (u, v) of every pixel centre."""
  v, u = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing='ij')
  return jnp.stack([u, v], axis=-1)


def camera_rays(uv: jnp.ndarray, intrinsics: jnp.ndarray,
                cam2lidar: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Perspective rays through continuous pixel positions.

  Args:
    uv: [..., 2] pixel coordinates; intrinsics [..., 3, 3]; cam2lidar [..., 4, 4] (broadcast).

  Returns:
    origins [..., 3] (camera centre) and unit directions [..., 3], LiDAR frame. A point at
    distance s along the ray is at origin + s * direction, so s is the Euclidean range.
  """
  fx, fy = intrinsics[..., 0, 0], intrinsics[..., 1, 1]
  cx, cy = intrinsics[..., 0, 2], intrinsics[..., 1, 2]
  d_cam = jnp.stack([(uv[..., 0] - cx) / fx, (uv[..., 1] - cy) / fy,
                     jnp.ones_like(uv[..., 0])], axis=-1)
  d = jnp.einsum('...ij,...j->...i', cam2lidar[..., :3, :3], d_cam)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  origins = jnp.broadcast_to(cam2lidar[..., :3, 3], d.shape)
  return origins, d


def bev_rays(xy: jnp.ndarray, z_top: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Top-down rays: from (x, y, z_top) straight down (-z).

  Args:
    xy: [..., 2] LiDAR-frame positions (m).

  Returns:
    origins [..., 3], directions [..., 3] (all (0, 0, -1)).
  """
  origins = jnp.concatenate([xy, jnp.full(xy.shape[:-1] + (1,), z_top, xy.dtype)], axis=-1)
  dirs = jnp.broadcast_to(jnp.array([0.0, 0.0, -1.0], xy.dtype), origins.shape)
  return origins, dirs


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
