"""nuscenes-devkit 1.2.0 declares numpy<2; we run it under numpy 2 (pyproject's uv override).
This proves the installed devkit really works under the installed numpy on a dataroot."""

from __future__ import annotations

import importlib.metadata

import numpy as np


def test_devkit_loads_a_dataroot_under_numpy_2(synthetic_dataroot):
  from nuscenes.map_expansion.map_api import NuScenesMap
  from nuscenes.nuscenes import NuScenes
  from nuscenes.utils.data_classes import LidarPointCloud

  assert int(np.__version__.split('.')[0]) >= 2
  assert importlib.metadata.version('nuscenes-devkit') == '1.2.0'
  nusc = NuScenes(version='v1.0-trainval', dataroot=synthetic_dataroot, verbose=False)
  assert len(nusc.sample) == 12 and len(nusc.scene) == 3
  sample = nusc.sample[0]
  path, boxes, intrinsic = nusc.get_sample_data(sample['data']['CAM_FRONT'])
  assert intrinsic.shape == (3, 3) and len(boxes) > 0
  lidar_path = nusc.get_sample_data_path(sample['data']['LIDAR_TOP'])
  cloud = LidarPointCloud.from_file(lidar_path)
  assert cloud.points.shape[0] == 4 and cloud.points.shape[1] > 1000
  points, coloring, image = nusc.explorer.map_pointcloud_to_image(
      sample['data']['LIDAR_TOP'], sample['data']['CAM_FRONT'])
  assert points.shape[0] == 3 and points.shape[1] > 100 and image.size == (400, 225)
  location = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
  pose = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])[
      'ego_pose_token'])
  masks = NuScenesMap(dataroot=synthetic_dataroot, map_name=location).get_map_mask(
      (pose['translation'][0], pose['translation'][1], 60, 60), 0.0,
      ['drivable_area', 'walkway'], (120, 120))
  assert masks.shape == (2, 120, 120) and masks[0].any()
