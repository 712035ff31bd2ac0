"""Global BEV augmentation: one random similarity transform of the LiDAR frame per example.

x' = A x with A = s * Rz(theta) @ diag(fx, fy, 1) (flips fx, fy in {-1, 1}), applied to
everything that lives in the LiDAR frame so the modalities stay consistent:
- points[:, :3] -> A points; cam2lidar -> A @ cam2lidar (a camera still sees the same pixels
  for the same physical point; with s != 1 cam2lidar is a similarity, not a rigid motion);
- boxes: centre -> A centre, sizes * s, yaw follows the flips and rotation, velocity -> A v;
- bev_map: out[c, i, j] = in[c, nearest cell of A^-1 (cell centre (i, j))], 0 outside.
Off by default (pre-training uses none); the pipeline seeds it per example.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Ranges of the random global transform."""
  max_rotation: float = math.pi / 4  # |theta| <= this (rad), uniform
  min_scale: float = 0.95
  max_scale: float = 1.05
  flip_x: bool = True  # x -> -x with probability 1/2
  flip_y: bool = True  # y -> -y with probability 1/2


def transform_matrix(theta, scale, flip_x, flip_y) -> tf.Tensor:
  """float32 [3, 3] A = scale * Rz(theta) @ diag(flip_x, flip_y, 1) (flips are +-1)."""
  theta, scale = tf.cast(theta, tf.float32), tf.cast(scale, tf.float32)
  c, s = tf.cos(theta), tf.sin(theta)
  rz = tf.stack([tf.stack([c, -s, 0.0]), tf.stack([s, c, 0.0]), tf.constant([0.0, 0.0, 1.0])])
  flips = tf.linalg.diag(tf.stack([tf.cast(flip_x, tf.float32), tf.cast(flip_y, tf.float32),
                                   1.0]))
  return scale * rz @ flips


def apply_transform(example: dict, theta, scale, flip_x, flip_y, half_extent: float,
                    resolution: float) -> dict:
  """Applies A (see transform_matrix) to the LiDAR-frame fields of one decoded record."""
  a = transform_matrix(theta, scale, flip_x, flip_y)
  out = dict(example)
  points = example['points']
  out['points'] = tf.concat([points[:, :3] @ tf.transpose(a), points[:, 3:]], axis=1)
  a4 = tf.pad(a, [[0, 1], [0, 1]]) + tf.pad([[1.0]], [[3, 0], [3, 0]])
  out['cam2lidar'] = tf.einsum('ij,kjl->kil', a4, example['cam2lidar'])
  boxes = example['boxes']
  fx, fy = tf.cast(flip_x, tf.float32), tf.cast(flip_y, tf.float32)
  centre = boxes[:, :3] @ tf.transpose(a)
  size = boxes[:, 3:6] * tf.cast(scale, tf.float32)
  # The length axis (cos y, sin y) becomes (fx cos y, fy sin y), then rotates by theta.
  yaw = boxes[:, 6:7]
  yaw = tf.atan2(fy * tf.sin(yaw), fx * tf.cos(yaw)) + tf.cast(theta, tf.float32)
  yaw = tf.math.floormod(yaw + math.pi, 2 * math.pi) - math.pi
  vel = tf.concat([boxes[:, 7:9], tf.zeros_like(boxes[:, 7:8])], axis=1) @ tf.transpose(a)
  out['boxes'] = tf.concat([centre, size, yaw, vel[:, :2]], axis=1)
  out['bev_map'] = _warp_bev(example['bev_map'], a[:2, :2], half_extent, resolution)
  return out


def _warp_bev(bev: tf.Tensor, a2: tf.Tensor, half_extent: float, resolution: float) -> tf.Tensor:
  """bev [C, n, n] indexed [x, y] -> nearest-neighbour resample at A^-1 of each cell centre."""
  n = tf.shape(bev)[1]
  centres = -half_extent + (tf.cast(tf.range(n), tf.float32) + 0.5) * resolution
  gx, gy = tf.meshgrid(centres, centres, indexing='ij')
  xy = tf.stack([tf.reshape(gx, [-1]), tf.reshape(gy, [-1])], axis=1)  # [n*n, 2]
  src = xy @ tf.transpose(tf.linalg.inv(a2))
  idx = tf.cast(tf.floor((src + half_extent) / resolution), tf.int32)
  inside = tf.reduce_all((idx >= 0) & (idx < n), axis=1)
  idx = tf.clip_by_value(idx, 0, n - 1)
  values = tf.gather_nd(tf.transpose(bev, [1, 2, 0]), idx)  # [n*n, C]
  values = tf.where(inside[:, None], values, tf.zeros_like(values))
  return tf.transpose(tf.reshape(values, [n, n, -1]), [2, 0, 1])


def random_global_transform(example: dict, aug: Augmentation, config, seed: tf.Tensor) -> dict:
  """Draws (theta, scale, flips) from `seed` ([2] int) and applies them (see module doc)."""
  u = tf.random.stateless_uniform([4], seed=seed)
  theta = (2.0 * u[0] - 1.0) * aug.max_rotation
  scale = aug.min_scale + u[1] * (aug.max_scale - aug.min_scale)
  flip_x = tf.where((u[2] < 0.5) & aug.flip_x, -1.0, 1.0)
  flip_y = tf.where((u[3] < 0.5) & aug.flip_y, -1.0, 1.0)
  return apply_transform(example, theta, scale, flip_x, flip_y, config.data.bev_half_extent,
                         config.data.bev_resolution)
