"""Sensor simulation: LiDAR sweeps and camera images (colour and depth) of one scene's world.

Poses: the ego pose at time t is (x, y, yaw) on the ground (z = 0); sensors sit at their rig
extrinsics. Returned LiDAR points are in the LIDAR_TOP frame; depth images are camera z-depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_prep.synthetic import raycast, rig, shading
from data_prep.synthetic.boxes import Boxes
from data_prep.synthetic.town import Town
from data_prep.synthetic.traffic import Scene

CAMERA_RANGE = 130.0
BOX_PUSH = 0.04  # LiDAR hits on boxes are moved this far inside so points_in_box counts them


@dataclasses.dataclass
class World:
  """A scene in its town: the full description needed to simulate any sensor at any time."""
  town: Town
  scene: Scene

  def boxes_at(self, t: float) -> Boxes:
    """Scenery then objects (instance >= 0) at time t seconds."""
    return Boxes.concat([self.town.scenery, self.scene.boxes_at(t)])

  def ego_matrix(self, t: float):
    """(rotation [3, 3], translation [3]) ego -> global at time t seconds."""
    x, y, yaw = self.scene.ego_pose(t)
    return rig.rot_z(yaw), np.array([x, y, 0.0])


def lidar_pose(world: World, t: float):
  """(rotation [3, 3], origin [3]) LIDAR_TOP -> global at time t seconds."""
  r_ego, t_ego = world.ego_matrix(t)
  return r_ego @ rig.rot_z(math.radians(rig.LIDAR_YAW_DEG)), t_ego + r_ego @ np.array(rig.LIDAR_TRANSLATION)


def lidar_sweep(world: World, t: float, rng: np.random.Generator):
  """One 360 deg sweep at time t seconds.

  Returns (points [N, 5] float32 in the LIDAR_TOP frame: x, y, z, intensity, ring;
  hits Hits of the [32, C] grid; boxes Boxes cast).
  """
  rot, origin = lidar_pose(world, t)
  rows, cols = len(rig.LIDAR_ELEVATIONS_DEG), rig.LIDAR_AZIMUTH_STEPS
  el = np.radians(rig.LIDAR_ELEVATIONS_DEG)[:, None]
  azimuth0 = math.atan2(rot[1, 0], rot[0, 0])
  az = azimuth0 + 2 * np.pi * np.arange(cols)[None, :] / cols
  # [3, rows, cols] planar global unit directions, float64: the stored points keep full precision.
  dirs = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                                      np.sin(el) + 0 * az))
  boxes = world.boxes_at(t)
  index = raycast.near_boxes(boxes, origin, rig.LIDAR_MAX_RANGE)
  spans = raycast.lidar_spans(boxes, index, origin, azimuth0, cols, el[:, 0])
  hits = raycast.cast_grid(world.town, boxes, origin, dirs, spans, rig.LIDAR_MAX_RANGE)
  t_hit = hits.t.copy()
  is_box = hits.hit >= 0
  noise = np.clip(rng.normal(0.0, rig.LIDAR_RANGE_NOISE, t_hit.shape), -0.02, 0.02)
  t_hit = t_hit + noise + np.where(is_box, BOX_PUSH, 0.0)
  keep = np.isfinite(hits.t) & (t_hit >= rig.LIDAR_MIN_RANGE)
  intensity = np.where(is_box, rig.BOX_INTENSITY[boxes.kind[np.maximum(hits.hit, 0)]],
                       rig.MATERIAL_INTENSITY[hits.material])
  intensity = intensity + rng.uniform(-rig.INTENSITY_NOISE, rig.INTENSITY_NOISE, intensity.shape)
  ring = np.broadcast_to(np.arange(rows)[:, None], (rows, cols))
  p_lidar = (t_hit[keep] * dirs[:, keep]).T @ rot
  points = np.concatenate([p_lidar, intensity[keep][:, None], ring[keep][:, None]], 1)
  return points.astype(np.float32), hits, boxes


def camera_pose(world: World, channel: str, t: float):
  """(rotation [3, 3], origin [3]) camera -> global at time t seconds."""
  r_ego, t_ego = world.ego_matrix(t)
  trans = np.array(rig.CAMERA_RIG[channel][1])
  return r_ego @ rig.camera_rotation(channel), t_ego + r_ego @ trans


def camera_render(world: World, channel: str, t: float, width: int, height: int):
  """Renders camera `channel` at time t seconds.

  Returns (rgb uint8 [H, W, 3], depth float32 [H, W] camera z-depth in metres, inf for sky).
  """
  rot, origin = camera_pose(world, channel, t)
  k = rig.camera_intrinsic(channel, width, height)
  u = ((np.arange(width) + 0.5 - k[0, 2]) / k[0, 0]).astype(np.float32)[None, :]
  v = ((np.arange(height) + 0.5 - k[1, 2]) / k[1, 1]).astype(np.float32)[:, None]
  # [3, H, W] planar global directions of (u, v, 1) in the camera frame: unit optical-axis
  # component so t is z-depth; float32 halves the cost of the box tests.
  rot32 = rot.astype(np.float32)
  dirs = np.stack([rot32[i, 0] * u + (rot32[i, 1] * v + rot32[i, 2]) for i in range(3)])
  boxes = world.boxes_at(t)
  index = raycast.near_boxes(boxes, origin, CAMERA_RANGE)
  spans = raycast.camera_spans(boxes, index, origin, rot, k, width, height)
  hits = raycast.cast_grid(world.town, boxes, origin, dirs, spans, CAMERA_RANGE)
  return shading.shade(world.town, boxes, origin, dirs, hits), hits.t.astype(np.float32)
