"""The converter against nuscenes-devkit's own functions, on the tiny synthetic world."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import functools

import numpy as np
import pytest

from helpers import tiny_config
from data_prep.nuscenes_nsmae import record as record_lib
from nsmae_jax.data import naming, schema

NUM_CHECKED = 3  # key frames checked per test (the world has 12)


@functools.lru_cache(maxsize=None)
def _nusc(dataroot: str):
  from nuscenes.nuscenes import NuScenes
  return NuScenes(version='v1.0-trainval', dataroot=dataroot, verbose=False)


@functools.lru_cache(maxsize=None)
def _map(dataroot: str, location: str):
  from nuscenes.map_expansion.map_api import NuScenesMap
  return NuScenesMap(dataroot=dataroot, map_name=location)


@pytest.fixture(scope='module')
def records(converted_data_dir, synthetic_dataroot):
  """{token: record (numpy)} of the converted tiny world, read without the project's reader."""
  import tensorflow_datasets as tfds
  config = tiny_config(data_dir=converted_data_dir, dataroot=synthetic_dataroot)
  builder = tfds.builder_from_directory(naming.dataset_dir(converted_data_dir, config.data))
  out = {}
  for split in ('train', 'val'):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      out[ex['token'].decode()] = ex
  return out


def _checked(records) -> list[str]:
  return sorted(records)[:NUM_CHECKED]


def _project(points_lidar: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray):
  """Pixels [N, 2] and depth [N] of LiDAR-frame points [N, 3] in a camera."""
  lidar2cam = np.linalg.inv(cam2lidar.astype(np.float64))
  cam = points_lidar @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
  uvw = cam @ intrinsics.astype(np.float64).T
  return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def _devkit_pixels(nusc, lidar_token, cam_token, points_lidar, monkeypatch) -> np.ndarray:
  """map_pointcloud_to_image's pixels [n, 2] (native image) for our points instead of the file."""
  from nuscenes.utils.data_classes import LidarPointCloud
  cloud = np.concatenate([points_lidar.T, np.zeros((1, len(points_lidar)))], axis=0)
  monkeypatch.setattr(LidarPointCloud, 'from_file',
                      classmethod(lambda cls, path: cls(cloud.astype(np.float32).copy())))
  pixels, _, _ = nusc.explorer.map_pointcloud_to_image(lidar_token, cam_token)
  monkeypatch.undo()
  return pixels[:2].T


def _projection_errors(nusc, rec, cam2lidar_of, monkeypatch) -> list[float]:
  """Per camera: max |our pixel - devkit pixel| in the stored image, over key-frame points
  that both keep (our selection stays 2 px inside the native image, depth > 1.5 m)."""
  sample = nusc.get('sample', rec['token'].decode())
  lidar_token = sample['data']['LIDAR_TOP']
  key_points = rec['points'][rec['points'][:, 4] == 0][:, :3].astype(np.float64)
  h, w = rec['images'].shape[1:3]
  errors = []
  for k, cam in enumerate(schema.CAMERAS):
    cam_token = sample['data'][cam]
    sd = nusc.get('sample_data', cam_token)
    sx, sy = w / sd['width'], h / sd['height']
    uv, depth = _project(key_points, rec['intrinsics'][k], cam2lidar_of(k, cam_token))
    native = (uv + 0.5) / np.array([sx, sy]) - 0.5
    keep = ((depth > 1.5) & (native[:, 0] > 2) & (native[:, 0] < sd['width'] - 3)
            & (native[:, 1] > 2) & (native[:, 1] < sd['height'] - 3))
    assert keep.sum() > 50, (cam, keep.sum())
    devkit = _devkit_pixels(nusc, lidar_token, cam_token, key_points[keep], monkeypatch)
    if len(devkit) != keep.sum():  # the devkit dropped points that we put inside the image
      errors.append(np.inf)
      continue
    devkit_stored = (devkit + 0.5) * np.array([sx, sy]) - 0.5
    errors.append(float(np.abs(devkit_stored - uv[keep]).max()))
  return errors


def test_projection_matches_map_pointcloud_to_image(records, synthetic_dataroot, monkeypatch):
  nusc = _nusc(synthetic_dataroot)
  for token in _checked(records):
    rec = records[token]
    errors = _projection_errors(nusc, rec, lambda k, _: rec['cam2lidar'][k], monkeypatch)
    assert max(errors) <= 0.5, (token, errors)


def test_projection_test_catches_missing_ego_motion(records, synthetic_dataroot, monkeypatch):
  """The same check with cam2lidar built without ego-motion compensation must fail."""
  nusc = _nusc(synthetic_dataroot)
  worst = []
  for token in _checked(records):
    rec = records[token]
    lidar_token = nusc.get('sample', token)['data']['LIDAR_TOP']
    def uncompensated(k, cam_token, lidar_token=lidar_token):
      del k
      return record_lib.camera_to_lidar(nusc, cam_token, lidar_token, compensate_ego_motion=False)
    worst.append(max(_projection_errors(nusc, rec, uncompensated, monkeypatch)))
  assert max(worst) > 0.5, worst


def _devkit_bev(nusc, dataroot, token, half_extent, resolution) -> np.ndarray:
  """get_map_mask around the LiDAR pose, written out independently of record.bev_patch."""
  sample = nusc.get('sample', token)
  lidar = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
  location = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
  from nuscenes.utils.geometry_utils import transform_matrix
  from pyquaternion import Quaternion
  cs = nusc.get('calibrated_sensor', lidar['calibrated_sensor_token'])
  pose = nusc.get('ego_pose', lidar['ego_pose_token'])
  lidar2global = (transform_matrix(pose['translation'], Quaternion(pose['rotation']))
                  @ transform_matrix(cs['translation'], Quaternion(cs['rotation'])))
  x_axis = lidar2global[:3, 0]
  yaw = np.arctan2(x_axis[1], x_axis[0])
  # Documented half-cell shift: the patch centre is the LiDAR (x, y) = (r/2, r/2).
  half = np.array([resolution / 2, resolution / 2, 0])
  centre = lidar2global[:3, :3] @ half + lidar2global[:3, 3]
  n = int(round(2 * half_extent / resolution))
  layers = ['drivable_area', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area',
            'road_divider', 'lane_divider']
  mask = _map(dataroot, location).get_map_mask(
      (centre[0], centre[1], 2 * half_extent, 2 * half_extent), np.degrees(yaw), layers, (n, n))
  mask = mask.transpose(0, 2, 1)  # [C, rows = y, cols = x] -> [C, x, y]
  return np.concatenate([mask[:5], np.maximum(mask[5], mask[6])[None]]).astype(np.uint8)


def test_bev_map_equals_get_map_mask(records, synthetic_dataroot):
  nusc = _nusc(synthetic_dataroot)
  config = tiny_config().data
  for token in _checked(records):
    want = _devkit_bev(nusc, synthetic_dataroot, token, config.bev_half_extent,
                       config.bev_resolution)
    got = records[token]['bev_map']
    assert got.shape == (6, config.bev_cells, config.bev_cells)
    assert want.sum() > 0
    np.testing.assert_array_equal(got, want)


def _surface_heights(records, swap_axes: bool = False) -> tuple[float, float]:
  """Most common z (2 cm bins) of key-frame returns in road-only and walkway-only cells.

  The mode picks the ground surface; trees, poles and people on the walkway would drag a
  median up. swap_axes reads the map as [y, x] (the classic transposition bug).
  """
  config = tiny_config().data
  e, r, n = config.bev_half_extent, config.bev_resolution, config.bev_cells
  road, walk = [], []
  for rec in records.values():
    pts = rec['points'][rec['points'][:, 4] == 0]
    i = np.floor((pts[:, 0] + e) / r).astype(int)
    j = np.floor((pts[:, 1] + e) / r).astype(int)
    ok = (i >= 0) & (i < n) & (j >= 0) & (j < n)
    pts, i, j = pts[ok], i[ok], j[ok]
    if swap_axes:
      i, j = j, i
    drivable, walkway = rec['bev_map'][0][i, j], rec['bev_map'][2][i, j]
    road.append(pts[(drivable == 1) & (walkway == 0), 2])
    walk.append(pts[(walkway == 1) & (drivable == 0), 2])

  def mode(z):
    counts, edges = np.histogram(np.concatenate(z), bins=np.arange(-4.0, 4.0, 0.02))
    return float(edges[counts.argmax()] + 0.01)
  return mode(road), mode(walk)


def test_bev_map_lines_up_with_lidar(records):
  """Walkway cells carry curb-height returns, road cells ground-height returns."""
  road, walk = _surface_heights(records)
  # The synthetic curb is 0.15 m high; the LiDAR is ~1.84 m above the road.
  assert 0.1 < walk - road < 0.2, (road, walk)
  assert -2.0 < road < -1.6, road
  # The check has teeth: reading the map transposed loses the curb step.
  road_t, walk_t = _surface_heights(records, swap_axes=True)
  assert abs(walk_t - road_t) < 0.06, (road_t, walk_t)


def test_boxes_equal_get_sample_data(records, synthetic_dataroot):
  from nuscenes.eval.detection.utils import category_to_detection_name
  nusc = _nusc(synthetic_dataroot)
  names = schema.DETECTION_CLASSES
  for token in _checked(records):
    rec = records[token]
    lidar_token = nusc.get('sample', token)['data']['LIDAR_TOP']
    _, boxes, _ = nusc.get_sample_data(lidar_token)
    sd = nusc.get('sample_data', lidar_token)
    cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
    pose = nusc.get('ego_pose', sd['ego_pose_token'])
    from pyquaternion import Quaternion
    want, labels = [], []
    for box in boxes:
      name = category_to_detection_name(box.name)
      if name is None:
        continue
      v = np.nan_to_num(nusc.box_velocity(box.token))
      v = Quaternion(cs['rotation']).inverse.rotate(Quaternion(pose['rotation']).inverse.rotate(v))
      want.append([*box.center, box.wlh[1], box.wlh[0], box.wlh[2],
                   box.orientation.yaw_pitch_roll[0], v[0], v[1]])
      labels.append(names.index(name))
    assert len(want) > 0
    np.testing.assert_allclose(rec['boxes'], np.asarray(want), atol=1e-4)
    np.testing.assert_array_equal(rec['box_labels'], labels)
    # Velocities of moving objects are non-trivial (the test is not comparing zeros).
    assert np.abs(rec['boxes'][:, 7:9]).max() > 0.5


def test_points_are_multisweep(records, synthetic_dataroot):
  from nuscenes.utils.data_classes import LidarPointCloud
  nusc = _nusc(synthetic_dataroot)
  config = tiny_config().data
  token = _checked(records)[0]
  cloud, times = LidarPointCloud.from_file_multisweep(
      nusc, nusc.get('sample', token), 'LIDAR_TOP', 'LIDAR_TOP', nsweeps=config.num_sweeps)
  want = np.concatenate([cloud.points.T, times.T], axis=1)
  np.testing.assert_allclose(records[token]['points'], want, atol=1e-5)
  lags = np.unique(records[token]['points'][:, 4])
  assert len(lags) == config.num_sweeps and lags[0] == 0.0 and lags[1] > 0
