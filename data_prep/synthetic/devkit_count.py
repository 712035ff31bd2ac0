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
