"""The synthetic world through the official nuscenes-devkit: tables, files, geometry, map."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep.synthetic import rig

BEV_LAYERS = ('drivable_area', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area',
              'road_divider', 'lane_divider')


@pytest.fixture(scope='module')
def nusc(synthetic_dataroot):
  from nuscenes import NuScenes  # pylint: disable=import-outside-toplevel
  return NuScenes('v1.0-trainval', synthetic_dataroot, verbose=False)


def _global_points(nusc, sd_token):
  """LiDAR points [N, 5] of a sample_data with x, y, z moved to the global frame."""
  from pyquaternion import Quaternion  # pylint: disable=import-outside-toplevel
  sd = nusc.get('sample_data', sd_token)
  pts = np.fromfile(os.path.join(nusc.dataroot, sd['filename']), np.float32).reshape(-1, 5)
  cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', sd['ego_pose_token'])
  xyz = pts[:, :3].astype(np.float64) @ Quaternion(cs['rotation']).rotation_matrix.T + cs['translation']
  xyz = xyz @ Quaternion(pose['rotation']).rotation_matrix.T + pose['translation']
  return np.concatenate([xyz, pts[:, 3:]], 1)


def test_tables_and_custom_split(nusc):
  from nuscenes.utils import splits  # pylint: disable=import-outside-toplevel
  assert len(nusc.scene) == 3 and len(nusc.sample) == 12
  train = splits.get_scenes_of_custom_split('train', nusc)
  val = splits.get_scenes_of_custom_split('val', nusc)
  assert sorted(train + val) == sorted(s['name'] for s in nusc.scene) and len(val) == 1
  # Official names of the same split: DetectionEval selects ground truth by them.
  official = splits.create_splits_scenes()
  assert set(train) <= set(official['train']) and set(val) <= set(official['val'])
  for sample in nusc.sample:
    assert set(sample['data']) == set(rig.CAMERAS) | {rig.LIDAR}
    for ch in rig.CAMERAS:
      sd = nusc.get('sample_data', sample['data'][ch])
      # Cameras fire after the LiDAR, as the spin passes them.
      assert 0 < sd['timestamp'] - sample['timestamp'] < rig.LIDAR_PERIOD_US
      assert nusc.get('ego_pose', sd['ego_pose_token'])['token'] == sd['token']
  assert {c['name'] for c in nusc.category} >= {v[0] for v in rig.CLASSES.values()}


def test_get_sample_data_boxes_and_num_lidar_pts(nusc):
  from nuscenes.utils.data_classes import LidarPointCloud  # pylint: disable=import-outside-toplevel
  from nuscenes.utils.geometry_utils import points_in_box  # pylint: disable=import-outside-toplevel
  checked = with_points = 0
  for sample in nusc.sample:
    path, boxes, _ = nusc.get_sample_data(sample['data'][rig.LIDAR])
    pc = LidarPointCloud.from_file(path)
    assert pc.points.shape[0] == 4 and pc.points.shape[1] > 10000
    raw = np.fromfile(path, np.float32).reshape(-1, 5)
    assert set(np.unique(raw[:, 4])) <= set(range(32))
    assert np.linalg.norm(raw[:, :3], axis=1).max() <= rig.LIDAR_MAX_RANGE + 0.1
    for box in boxes:
      ann = nusc.get('sample_annotation', box.token)
      n = int(points_in_box(box, pc.points[:3]).sum())
      assert n == ann['num_lidar_pts'], (box.token, n, ann['num_lidar_pts'])
      checked += 1
      with_points += n > 0
  assert checked > 50 and with_points > 20


def test_multisweep_and_velocity(nusc):
  from nuscenes.utils.data_classes import LidarPointCloud  # pylint: disable=import-outside-toplevel
  sample = nusc.sample[-1]
  pc, times = LidarPointCloud.from_file_multisweep(nusc, sample, rig.LIDAR, rig.LIDAR, nsweeps=3)
  lags = np.unique(np.round(times[0], 3))
  # 2 sweeps between key frames at 2 Hz: lags 0, 1/6 s, 1/3 s.
  np.testing.assert_allclose(lags, [0.0, 0.167, 0.333], atol=2e-3)
  speeds = {}
  for ann in nusc.sample_annotation:
    v = nusc.box_velocity(ann['token'])
    if np.all(np.isfinite(v[:2])):
      speeds.setdefault(nusc.get('instance', ann['instance_token'])['token'], []).append(
          (np.hypot(*v[:2]), ann['attribute_tokens']))
  moving = [s for s, a in sum(speeds.values(), []) if a and nusc.get('attribute', a[0])['name'] == 'vehicle.moving']
  parked = [s for s, a in sum(speeds.values(), []) if a and nusc.get('attribute', a[0])['name'] == 'vehicle.parked']
  assert moving and parked
  # m/s, not m/us: the simulated traffic drives at 2.5-11 m/s.
  assert 1.0 < np.median(moving) < 12.0
  assert np.max(parked) < 1e-6


def test_detection_eval_load_gt(nusc):
  from nuscenes.eval.common.loaders import load_gt_of_sample_tokens  # pylint: disable=import-outside-toplevel
  from nuscenes.eval.detection.data_classes import DetectionBox  # pylint: disable=import-outside-toplevel
  from nuscenes.utils import splits  # pylint: disable=import-outside-toplevel
  val = set(splits.get_scenes_of_custom_split('val', nusc))
  tokens = [s['token'] for s in nusc.sample if nusc.get('scene', s['scene_token'])['name'] in val]
  gt = load_gt_of_sample_tokens(nusc, tokens, DetectionBox)
  names = {b.detection_name for t in gt.sample_tokens for b in gt[t]}
  assert len(tokens) == 4 and len(gt.all) > 20
  assert {'car', 'pedestrian'} <= names <= set(rig.CLASS_NAMES)


def test_map_masks_and_ground_truth(nusc):
  from nuscenes.map_expansion.map_api import NuScenesMap  # pylint: disable=import-outside-toplevel
  walk_hits = walk_side = road_hits = road_drivable = 0
  seen = np.zeros(len(BEV_LAYERS), bool)
  for sample in nusc.sample[::2]:
    sd = nusc.get('sample_data', sample['data'][rig.LIDAR])
    loc = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
    nmap = NuScenesMap(nusc.dataroot, loc)
    pose = nusc.get('ego_pose', sd['ego_pose_token'])
    x, y = pose['translation'][:2]
    # 0.1 m cells, axis-aligned patch (angle 0): row i <-> y, column j <-> x.
    masks = nmap.get_map_mask((x, y, 80.0, 80.0), 0.0, list(BEV_LAYERS), (800, 800))
    assert masks.shape == (7, 800, 800)
    seen |= masks.reshape(7, -1).any(1)
    pts = _global_points(nusc, sd['token'])
    i = np.floor((pts[:, 1] - (y - 40.0)) / 0.1).astype(int)
    j = np.floor((pts[:, 0] - (x - 40.0)) / 0.1).astype(int)
    ok = (i >= 0) & (i < 800) & (j >= 0) & (j < 800)
    pts, i, j = pts[ok], i[ok], j[ok]
    # Returns from the raised surface's top (curb faces lie below it, objects above it).
    ground = np.abs(pts[:, 2] - rig.CURB_HEIGHT) < 0.02
    sidewalk = np.abs(pts[:, 3] - 32.0) <= rig.INTENSITY_NOISE + 1e-3
    in_walk = masks[2][i, j] > 0
    walk_hits += int((ground & in_walk).sum())
    walk_side += int((ground & in_walk & sidewalk).sum())
    asphalt = (np.abs(pts[:, 2]) < 0.02) & (np.abs(pts[:, 3] - 6.0) <= rig.INTENSITY_NOISE + 1e-3)
    road_hits += int(asphalt.sum())
    road_drivable += int((asphalt & (masks[0][i, j] > 0)).sum())
  assert seen.all(), dict(zip(BEV_LAYERS, seen))
  print(f'walkway mask: {walk_side}/{walk_hits} top-surface returns are sidewalk; drivable mask: '
        f'{road_drivable}/{road_hits} asphalt returns')
  assert walk_hits > 500 and walk_side / walk_hits >= 0.95, (walk_side, walk_hits)
  assert road_hits > 1000 and road_drivable / road_hits >= 0.99, (road_drivable, road_hits)


def test_all_four_map_files_and_bevfusion_rotated_mask(nusc):
  from nuscenes.map_expansion.map_api import NuScenesMap  # pylint: disable=import-outside-toplevel
  for loc in rig.LOCATIONS:
    NuScenesMap(nusc.dataroot, loc)  # loads, possibly empty
  sample = nusc.sample[5]
  sd = nusc.get('sample_data', sample['data'][rig.LIDAR])
  pose = nusc.get('ego_pose', sd['ego_pose_token'])
  from pyquaternion import Quaternion  # pylint: disable=import-outside-toplevel
  yaw = np.degrees(Quaternion(pose['rotation']).yaw_pitch_roll[0]) + 30.0
  loc = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
  masks = NuScenesMap(nusc.dataroot, loc).get_map_mask(
      (pose['translation'][0], pose['translation'][1], 100, 100), yaw, list(BEV_LAYERS), (200, 200))
  assert masks.shape == (7, 200, 200) and masks[0].mean() > 0.05


def test_lidar_agrees_with_rendered_camera_depth(nusc):
  from data_prep.synthetic.world_io import camera_depth  # pylint: disable=import-outside-toplevel
  errors = []
  for sample in nusc.sample[:2]:
    for ch in rig.CAMERAS:
      pts, depth_lidar, _ = nusc.explorer.map_pointcloud_to_image(
          sample['data'][rig.LIDAR], sample['data'][ch], min_dist=1.0)
      depth = camera_depth(nusc, sample['data'][ch])
      u = np.floor(pts[0]).astype(int)
      v = np.floor(pts[1]).astype(int)
      rendered = depth[v, u]
      ok = np.isfinite(rendered)
      errors.append(np.abs(depth_lidar[ok] - rendered[ok]) / rendered[ok])
  err = np.concatenate(errors)
  print(f'LiDAR vs rendered depth: median {np.median(err):.4f}, p90 {np.percentile(err, 90):.4f}, '
        f'n={len(err)}')
  assert len(err) > 5000
  assert np.median(err) < 0.02


def test_splits_file_format(synthetic_dataroot):
  with open(os.path.join(synthetic_dataroot, 'v1.0-trainval', 'splits.json')) as f:
    data = json.load(f)
  assert set(data) == {'train', 'val'} and len(data['train']) == 2 and len(data['val']) == 1
  assert data == {'train': ['scene-0001', 'scene-0002'], 'val': ['scene-0003']}


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--num_scenes=2'], 'error: --val_scenes: invalid value 2: need 0 <= val_scenes < '
                         'num_scenes (2)'),
    (['--val_scenes=0', '--image_width=8'], 'error: --image_width: invalid value 8: need '
                                            '16..4000'),
])
def test_cli_bad_value_is_one_line_and_exit_2(tmp_path, args, message):
  """Like the other entry points' bad flags: one `error: --flag: ...` line, status 2, no
  traceback, nothing written."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'world'
  result = subprocess.run([sys.executable, '-m', 'data_prep.make_synthetic', f'--out={out}',
                           *args], cwd=repo, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == message
  assert not out.exists()
