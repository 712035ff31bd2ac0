"""num_lidar_pts exactly as nuscenes-devkit counts it, without importing the devkit.

Importing `nuscenes` pulls in scikit-learn and costs seconds in every worker; these few lines
repeat the devkit's Box.translate/rotate/corners and geometry_utils.points_in_box operation for
operation (same float64 arithmetic), so the count equals the devkit's on the stored points.
"""

from __future__ import annotations

import numpy as np
from pyquaternion import Quaternion


def box_in_sensor(translation, size, rotation, ego_pose: dict, calib: dict):
  """(center [3], wlh [3], orientation Quaternion) of an annotation in the sensor frame, as
  NuScenes.get_sample_data builds it for a key frame."""
  center = np.array(translation)
  orientation = Quaternion(rotation)
  for record in (ego_pose, calib):
    center += -np.array(record['translation'])
    q = Quaternion(record['rotation']).inverse
    center = np.dot(q.rotation_matrix, center)
    orientation = q * orientation
  return center, np.array(size), orientation


def count_points_in_box(center, wlh, orientation: Quaternion, points: np.ndarray) -> int:
  """Number of points [3, N] inside the box (devkit points_in_box, wlh_factor 1)."""
  w, l, h = wlh
  x_corners = l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
  y_corners = w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
  z_corners = h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])
  corners = np.dot(orientation.rotation_matrix, np.vstack((x_corners, y_corners, z_corners)))
  x, y, z = center
  corners[0, :] = corners[0, :] + x
  corners[1, :] = corners[1, :] + y
  corners[2, :] = corners[2, :] + z
  p1 = corners[:, 0]
  i, j, k = corners[:, 4] - p1, corners[:, 1] - p1, corners[:, 3] - p1
  v = points - p1.reshape((-1, 1))
  iv, jv, kv = np.dot(i, v), np.dot(j, v), np.dot(k, v)
  mask = ((0 <= iv) & (iv <= np.dot(i, i)) & (0 <= jv) & (jv <= np.dot(j, j))
          & (0 <= kv) & (kv <= np.dot(k, k)))
  return int(mask.sum())


class SortedPoints:
  """Points [N, 3] (sensor frame) sorted by x, so that a box is tested only against the points
  within its bounding sphere's x range. The inside test is elementwise, so the count on that
  slab equals count_points_in_box on all the points."""

  def __init__(self, points: np.ndarray):
    order = np.argsort(points[:, 0], kind='stable')
    self.x = points[order, 0]
    self.xyz = np.ascontiguousarray(points[order].T)  # [3, N], the dtype of `points`

  def count_in_box(self, center, wlh, orientation: Quaternion) -> int:
    radius = 0.5 * float(np.linalg.norm(wlh)) + 1e-3
    lo = np.searchsorted(self.x, center[0] - radius, side='left')
    hi = np.searchsorted(self.x, center[0] + radius, side='right')
    return count_points_in_box(center, wlh, orientation, self.xyz[:, lo:hi])
