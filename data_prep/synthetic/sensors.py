"""Sensor simulation: LiDAR sweeps and camera images (colour and depth) of one scene's world.

Poses: the ego pose at time t is (x, y, yaw) on the ground (z = 0); sensors sit at their rig
extrinsics. Returned LiDAR points are in the LIDAR_TOP frame; depth images are camera z-depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_prep.synthetic import raycast, rig
from data_prep.synthetic.boxes import Boxes
from data_prep.synthetic.town import Town
from data_prep.synthetic.traffic import Scene

SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])
HORIZON = np.array([0.80, 0.85, 0.90], np.float32)
ZENITH = np.array([0.40, 0.56, 0.85], np.float32)
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
  dirs = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                                      np.sin(el) + 0 * az), -1)
  boxes = world.boxes_at(t)
  index = raycast.near_boxes(boxes, origin, rig.LIDAR_MAX_RANGE)
  spans = raycast.lidar_spans(boxes, index, origin, azimuth0, cols, rows)
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
  p_global = origin + t_hit[keep][:, None] * dirs[keep]
  p_lidar = (p_global - origin) @ rot
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
  u = (np.arange(width) + 0.5 - k[0, 2]) / k[0, 0]
  v = (np.arange(height) + 0.5 - k[1, 2]) / k[1, 1]
  d_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), -1)
  # [H, W, 3] global, unit optical-axis component so t is z-depth; float32 halves the cost.
  dirs = (d_cam @ rot.T).astype(np.float32)
  boxes = world.boxes_at(t)
  index = raycast.near_boxes(boxes, origin, CAMERA_RANGE)
  spans = raycast.camera_spans(boxes, index, origin, rot, k, width, height)
  hits = raycast.cast_grid(world.town, boxes, origin, dirs, spans, CAMERA_RANGE)
  rgb = shade(world.town, boxes, origin, dirs, hits)
  return (np.clip(rgb * 255.0 + 0.5, 0, 255)).astype(np.uint8), hits.t.astype(np.float32)


def shade(town: Town, boxes: Boxes, origin: np.ndarray, dirs: np.ndarray, hits) -> np.ndarray:
  """Colour [R, C, 3] in 0-1 of every ray: textured ground, patterned boxes, sky, light fog."""
  norm = np.sqrt(np.einsum('...k,...k->...', dirs, dirs))
  elev = np.clip(dirs[..., 2] / norm, 0.0, 1.0)[..., None]
  out = HORIZON * (1 - elev) + ZENITH * elev
  t = np.where(np.isfinite(hits.t), hits.t, 0.0).astype(np.float32)
  p = origin.astype(np.float32) + t[..., None] * dirs
  ground = (hits.hit == raycast.GROUND) | (hits.hit == raycast.CURB)
  if ground.any():
    gp = p[ground]
    tex = town.texture_at(gp[:, 0], gp[:, 1]).astype(np.float32) / 255.0
    albedo = rig.MATERIAL_ALBEDO[hits.material[ground]] * (0.82 + 0.36 * tex)[:, None]
    light = np.where(hits.hit[ground] == raycast.CURB, 0.75, 0.55 + 0.45 * SUN[2])
    out[ground] = albedo * light[:, None]
  on_box = hits.hit >= 0
  if on_box.any():
    out[on_box] = _shade_boxes(boxes, hits.hit[on_box], hits.face[on_box], p[on_box])
  dist = t * norm
  fog = (1.0 - np.exp(-dist / 350.0))[..., None] * (hits.hit != raycast.SKY)[..., None]
  return out * (1 - fog) + HORIZON * fog


def _shade_boxes(boxes: Boxes, idx, face, p) -> np.ndarray:
  """Albedo pattern x Lambert shading for box hits (p [M, 3] global hit points)."""
  c, s = np.cos(boxes.yaw[idx]), np.sin(boxes.yaw[idx])
  rel = p - boxes.centre[idx]
  lx = rel[:, 0] * c + rel[:, 1] * s  # along the length
  ly = -rel[:, 0] * s + rel[:, 1] * c
  size = boxes.size[idx]
  zb = rel[:, 2] + size[:, 2] / 2  # height above the box bottom
  axis = face // 2
  sign = np.where(face % 2 == 1, 1.0, -1.0)
  n_local = np.zeros((len(idx), 3))
  n_local[np.arange(len(idx)), axis] = sign
  normal = np.stack([n_local[:, 0] * c - n_local[:, 1] * s, n_local[:, 0] * s + n_local[:, 1] * c,
                     n_local[:, 2]], 1)
  light = 0.5 + 0.5 * np.clip(normal @ SUN, 0.0, 1.0)
  col = boxes.colour[idx].astype(np.float64)
  kind = boxes.kind[idx]
  k = rig.BOX_KIND_ID
  side = axis < 2
  h = size[:, 2]
  along = np.where(axis == 0, ly, lx)
  # Buildings: window grid on facades, flat grey roofs.
  b = kind == k['building']
  win = (b & side & ((along / 3.2) % 1.0 > 0.3) & ((along / 3.2) % 1.0 < 0.75)
         & ((zb / 3.4) % 1.0 > 0.35) & ((zb / 3.4) % 1.0 < 0.8) & (zb > 2.0))
  col[win] = (0.18, 0.24, 0.33)
  col[b & ~side] = col[b & ~side] * 0.6
  # Vehicles and two-wheelers: dark wheels band, glass band on the sides.
  v = (kind == k['vehicle']) | (kind == k['cycle'])
  col[v & (zb < 0.28 * h)] = (0.06, 0.06, 0.07)
  col[v & side & (zb > 0.58 * h) & (zb < 0.88 * h)] = (0.14, 0.17, 0.22)
  # Pedestrians: head, shirt, trousers.
  ped = kind == k['pedestrian']
  col[ped & (zb > 0.86 * h)] = (0.86, 0.66, 0.52)
  col[ped & (zb < 0.47 * h)] *= 0.35
  cone = kind == k['cone']
  col[cone & (zb > 0.45 * h) & (zb < 0.65 * h)] = (0.95, 0.95, 0.95)
  bar = kind == k['barrier']
  col[bar & ((lx / 0.6) % 1.0 < 0.5)] = (0.85, 0.1, 0.1)
  crown = kind == k['tree_crown']
  grain = 0.75 + 0.5 * (0.5 + 0.5 * np.sin(p[:, 0] * 5.1 + np.sin(p[:, 1] * 4.3) * 3 + p[:, 2] * 6.7))
  col[crown] *= grain[crown, None]
  return col * light[:, None]
