"""Fake batches with the real batch contract (DESIGN.md "The batch"), for model and trainer tests.

Geometry is plausible, not consistent: images are noise, points are uniform in the BEV extent.
Use the synthetic nuScenes world for anything that needs the modalities to agree.
"""

from __future__ import annotations

import numpy as np

from nsmae_jax.config import Config
from nsmae_jax.data.schema import NUM_CAMERAS, NUM_MAP_CLASSES



def _camera_rig(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """A nuScenes-like rig: intrinsics [6,3,3] for (height, width) and cam2lidar [6,4,4].

  The LiDAR frame is x right, y forward, z up; a camera looks along its optical z with x right
  and y down. Camera yaws follow the nuScenes order FRONT, FRONT_RIGHT, FRONT_LEFT, BACK,
  BACK_LEFT, BACK_RIGHT.
  """
  yaws = np.deg2rad([0.0, -55.0, 55.0, 180.0, 110.0, -110.0])
  focal = 0.79 * width  # ~1266 / 1600 of the real rig
  intr = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float32)
  # Camera axes in the LiDAR frame for yaw 0 (looking along +y): x_cam = +x, y_cam = -z,
  # z_cam = +y.
  base = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)  # columns: cam axes
  cam2lidar = np.zeros((NUM_CAMERAS, 4, 4), np.float32)
  for k, yaw in enumerate(yaws):
    c, s = np.cos(yaw), np.sin(yaw)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    cam2lidar[k, :3, :3] = rz @ base
    cam2lidar[k, :3, 3] = rz @ np.array([0.0, 0.5, -0.3])
    cam2lidar[k, 3, 3] = 1.0
  return np.repeat(intr[None], NUM_CAMERAS, 0), cam2lidar


def fake_batch(config: Config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """One host batch [batch_size, ...] with the contract's keys, shapes and dtypes."""
  rng = np.random.default_rng(seed)
  d = config.data
  h, w, e = d.image_height, d.image_width, d.bev_half_extent
  p, m, hb = d.max_points, d.max_boxes, d.bev_cells
  intr, cam2lidar = _camera_rig(h, w)
  n_valid = rng.integers(p // 2, p + 1, size=batch_size)
  points = np.concatenate([
      rng.uniform(-e, e, size=(batch_size, p, 2)),
      rng.uniform(config.model.z_min, config.model.z_max, size=(batch_size, p, 1)),
      rng.uniform(0, 1, size=(batch_size, p, 1)),
      # Like a real record: the key frame's returns (time lag 0) first, then older sweeps.
      np.where(np.arange(p)[None, :, None] < p // 2, 0.0,
               rng.uniform(0.05, 0.5, size=(batch_size, p, 1)))], axis=-1).astype(np.float32)
  points_mask = np.arange(p)[None] < n_valid[:, None]
  boxes = rng.normal(size=(batch_size, m, 9)).astype(np.float32)
  return {
      'images': rng.uniform(0, 1, size=(batch_size, NUM_CAMERAS, h, w, 3)).astype(np.float32),
      'intrinsics': np.broadcast_to(intr, (batch_size, NUM_CAMERAS, 3, 3)).copy(),
      'cam2lidar': np.broadcast_to(cam2lidar, (batch_size, NUM_CAMERAS, 4, 4)).copy(),
      'points': np.where(points_mask[..., None], points, 0).astype(np.float32),
      'points_mask': points_mask,
      'bev_map': (rng.uniform(size=(batch_size, NUM_MAP_CLASSES, hb, hb)) > 0.7).astype(np.uint8),
      'boxes': boxes,
      'box_labels': rng.integers(0, 10, size=(batch_size, m)).astype(np.int32),
      'boxes_mask': np.arange(m)[None] < rng.integers(0, m + 1, size=(batch_size, 1)),
  }


class FakeIterator:
  """Endless host batches [num_devices, per_device, ...] of fake_batch, checkpointable.

  Batch k is a deterministic function of (seed, k), and the global batch is split over devices
  by reshaping, so 1 device x 2 and 2 devices x 1 see the same examples. State: {'index': k}.
  """

  def __init__(self, config: Config, num_devices: int, seed: int = 0):
    self.config, self.num_devices, self.seed, self.index = config, num_devices, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    per_device = self.config.train.per_device_batch_size
    batch = fake_batch(self.config, per_device * self.num_devices, seed=self.seed * 100003 +
                       self.index)
    self.index += 1
    return {k: v.reshape((self.num_devices, per_device) + v.shape[1:]) for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'index': self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state['index'])
