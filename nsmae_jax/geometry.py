"""Camera geometry shared by the models, the pre-training targets and the renderer.

Everything is in the key frame's LiDAR frame (x right, y forward, z up, metres).

Pixel convention (OpenCV, and nuScenes' intrinsics): pixel (row r, col c) is centred at the
continuous image coordinate (u, v) = (c, r) and covers [c - 1/2, c + 1/2) x [r - 1/2, r + 1/2),
so the image plane spans [-1/2, W - 1/2) x [-1/2, H - 1/2) and a projected point (u, v) (as the
devkit's `view_points` returns it) falls in pixel (round(v), round(u)). The converter's resized
intrinsics (u -> (u + 1/2) s - 1/2) and cv2.resize follow the same convention. This module
imports no other nsmae_jax module.
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
  """[..., 2] -> [...] bool: inside the image plane [-1/2, W - 1/2) x [-1/2, H - 1/2)."""
  return ((uv[..., 0] >= -0.5) & (uv[..., 0] < width - 0.5) & (uv[..., 1] >= -0.5)
          & (uv[..., 1] < height - 0.5))


def pixel_index(uv: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[..., 2] continuous (u, v) -> [..., 2] int32 (row, col) of the pixel holding it (clipped)."""
  rc = jnp.floor(uv[..., ::-1] + 0.5).astype(jnp.int32)
  return jnp.clip(rc, 0, jnp.array([height - 1, width - 1]))


def pixel_centers(height: int, width: int) -> jnp.ndarray:
  """[H, W, 2] (u, v) of every pixel centre: (c, r)."""
  v, u = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                      jnp.arange(width, dtype=jnp.float32), indexing='ij')
  return jnp.stack([u, v], axis=-1)


def camera_rays(uv: jnp.ndarray, intrinsics: jnp.ndarray,
                cam2lidar: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Perspective rays through continuous pixel positions (the inverse of project_points).

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


def grid_centers(shape: tuple[int, ...], box_min, box_max) -> jnp.ndarray:
  """[*shape, len(shape)] cell centres of a regular grid over [box_min, box_max) (LiDAR frame, m).

  Cell (i, j, ...) is centred at box_min + (index + 1/2) * cell size, as DESIGN.md's BEV cells.
  """
  axes = [box_min[a] + (jnp.arange(n) + 0.5) * (box_max[a] - box_min[a]) / n
          for a, n in enumerate(shape)]
  return jnp.stack(jnp.meshgrid(*axes, indexing='ij'), axis=-1)


def bilinear_corners(h: int, w: int, uv: jnp.ndarray, image_hw: tuple[int, int]
                     ) -> tuple[jnp.ndarray, ...]:
  """The 4 taps of bilinear_sample on an [h, w] map covering the H x W image (same convention).

  Returns:
    y0, x0, y1, x1 [N] int32 cell indices and fy, fx [N] the weights of the y1 / x1 taps: the
    sample is (1 - fy) ((1 - fx) m[y0, x0] + fx m[y0, x1]) + fy ((1 - fx) m[y1, x0] + fx m[y1, x1]).
  """
  x = jnp.clip((uv[:, 0] + 0.5) * (w / image_hw[1]) - 0.5, 0.0, w - 1.0)
  y = jnp.clip((uv[:, 1] + 0.5) * (h / image_hw[0]) - 0.5, 0.0, h - 1.0)
  x0 = jnp.clip(jnp.floor(x).astype(jnp.int32), 0, max(w - 2, 0))
  y0 = jnp.clip(jnp.floor(y).astype(jnp.int32), 0, max(h - 2, 0))
  x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
  return y0, x0, y1, x1, y - y0, x - x0


def bilinear_sample(feature_map: jnp.ndarray, uv: jnp.ndarray, image_hw: tuple[int, int]
                    ) -> jnp.ndarray:
  """Samples a feature map covering the whole image at image pixel coordinates.

  Args:
    feature_map: [h, w, C] covering the H x W image: cell (r, c) spans image pixels
      [c W/w, (c + 1) W/w) x [r H/h, (r + 1) H/h), so its centre is at image
      u = (c + 1/2) W/w - 1/2 (the module's pixel convention). With h, w = H, W, cell (r, c)
      is pixel (r, c) and integer (u, v) return the pixel's value exactly.
    uv: [N, 2] image pixel coordinates (u right, v down); clamped at the border.
    image_hw: (H, W) of the image the intrinsics describe.

  Returns:
    [N, C].
  """
  h, w, _ = feature_map.shape
  y0, x0, y1, x1, fy, fx = bilinear_corners(h, w, uv, image_hw)
  fx, fy = fx[:, None], fy[:, None]
  fm = feature_map
  return ((1 - fy) * ((1 - fx) * fm[y0, x0] + fx * fm[y0, x1])
          + fy * ((1 - fx) * fm[y1, x0] + fx * fm[y1, x1]))
