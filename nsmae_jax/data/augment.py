"""Global BEV augmentation: one random similarity transform of the LiDAR frame per example.

x' = A x with A = s * Rz(theta) @ diag(fx, fy, 1) (flips fx, fy in {-1, 1}), applied to
everything that lives in the LiDAR frame so the modalities stay consistent:
- points[:, :3] -> A points; cam2lidar -> A @ cam2lidar (a camera still sees the same pixels
  for the same physical point; with s != 1 cam2lidar is a similarity, not a rigid motion);
- boxes: centre -> A centre, sizes * s, yaw follows the flips and rotation, velocity -> A v;
- bev_map: out[c, i, j] = in[c, nearest cell of A^-1 (cell centre (i, j))], 0 outside.
Off by default (pre-training uses none); the pipeline seeds it per example. NumPy only, so it
runs in grain worker processes without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Ranges of the random global transform."""
  max_rotation: float = math.pi / 4  # |theta| <= this (rad), uniform
  min_scale: float = 0.95
  max_scale: float = 1.05
  flip_x: bool = True  # x -> -x with probability 1/2
  flip_y: bool = True  # y -> -y with probability 1/2


def transform_matrix(theta: float, scale: float, flip_x: float, flip_y: float) -> np.ndarray:
  """float64 [3, 3] A = scale * Rz(theta) @ diag(flip_x, flip_y, 1) (flips are +-1)."""
  c, s = math.cos(theta), math.sin(theta)
  rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  return scale * rz @ np.diag([float(flip_x), float(flip_y), 1.0])


def apply_transform(example: dict, theta: float, scale: float, flip_x: float, flip_y: float,
                    half_extent: float, resolution: float) -> dict:
  """Applies A (see transform_matrix) to the LiDAR-frame fields of one decoded record.

  Args:
    example: numpy arrays, LiDAR frame: points [N, 5], cam2lidar [6, 4, 4], boxes [M, 9]
      (x, y, z, l, w, h, yaw, vx, vy), bev_map [C, n, n] indexed [x, y]; other keys pass.
    theta, scale, flip_x, flip_y: the transform (flips are +-1).
    half_extent, resolution: the BEV grid of bev_map (m).

  Returns:
    A new dict with the transformed fields in their input dtypes (float32 geometry).
  """
  a = transform_matrix(theta, scale, flip_x, flip_y)
  out = dict(example)
  points = example['points']
  out['points'] = np.concatenate([points[:, :3] @ a.T, points[:, 3:]], axis=1).astype(
      points.dtype)
  a4 = np.eye(4)
  a4[:3, :3] = a
  out['cam2lidar'] = np.einsum('ij,kjl->kil', a4, example['cam2lidar']).astype(
      example['cam2lidar'].dtype)
  boxes = example['boxes']
  centre = boxes[:, :3] @ a.T
  size = boxes[:, 3:6] * scale
  # The length axis (cos y, sin y) becomes (fx cos y, fy sin y), then rotates by theta.
  yaw = boxes[:, 6:7].astype(np.float64)
  yaw = np.arctan2(flip_y * np.sin(yaw), flip_x * np.cos(yaw)) + theta
  yaw = np.mod(yaw + math.pi, 2 * math.pi) - math.pi
  vel = boxes[:, 7:9] @ a[:2, :2].T  # A keeps z apart, so planar velocity maps by its 2x2 block
  out['boxes'] = np.concatenate([centre, size, yaw, vel], axis=1).astype(boxes.dtype)
  out['bev_map'] = _warp_bev(example['bev_map'], a[:2, :2], half_extent, resolution)
  return out


def _warp_bev(bev: np.ndarray, a2: np.ndarray, half_extent: float,
              resolution: float) -> np.ndarray:
  """bev [C, n, n] indexed [x, y] -> nearest-neighbour resample at A^-1 of each cell centre."""
  n = bev.shape[1]
  centres = -half_extent + (np.arange(n) + 0.5) * resolution
  gx, gy = np.meshgrid(centres, centres, indexing='ij')
  xy = np.stack([gx.ravel(), gy.ravel()], axis=1)  # [n*n, 2]
  src = xy @ np.linalg.inv(a2).T
  idx = np.floor((src + half_extent) / resolution).astype(np.int64)
  inside = np.all((idx >= 0) & (idx < n), axis=1)
  idx = np.clip(idx, 0, n - 1)
  values = bev[:, idx[:, 0], idx[:, 1]]  # [C, n*n]
  values = np.where(inside[None], values, np.zeros_like(values))
  return values.reshape(bev.shape)


def random_global_transform(example: dict, aug: Augmentation, half_extent: float,
                            resolution: float, rng: np.random.Generator) -> dict:
  """Draws (theta, scale, flips) from `rng` and applies them (see module doc)."""
  u = rng.uniform(size=4)
  theta = (2.0 * u[0] - 1.0) * aug.max_rotation
  scale = aug.min_scale + u[1] * (aug.max_scale - aug.min_scale)
  flip_x = -1.0 if (u[2] < 0.5 and aug.flip_x) else 1.0
  flip_y = -1.0 if (u[3] < 0.5 and aug.flip_y) else 1.0
  return apply_transform(example, theta, scale, flip_x, flip_y, half_extent, resolution)
