"""One nuScenes key frame -> one `nuscenes_nsmae` record, through nuscenes-devkit only.

Every geometric quantity comes from a devkit function or is composed exactly as the devkit
composes it, so the converter can be checked against the devkit (tests/test_convert*.py):
- cam2lidar: the chain of `NuScenesExplorer.map_pointcloud_to_image`, inverted
  (camera -> ego(t_cam) -> global -> ego(t_lidar) -> lidar).
- points: `LidarPointCloud.from_file_multisweep` (key frame + sweeps in the key frame's LiDAR
  frame, with their time lag in seconds).
- boxes: `NuScenes.get_sample_data(lidar)` (already in the LiDAR frame) + `box_velocity`.
- bev_map: `NuScenesMap.get_map_mask` around the LiDAR pose.

All record geometry is in the key frame's LIDAR_TOP frame (x right, y forward, z up, metres).
The devkit is imported lazily so that reading a converted dataset never needs it.

Bad input: a missing or unreadable file (image, .pcd.bin, sweep) is a MissingInputError naming
the file and the sample (the converter's --skip_missing skips such key frames); calibration that
cannot be a rigid transform or a camera matrix, and an image whose size is not its
sample_data row's, are a BadInputError (never skipped: the whole table would be suspect);
LiDAR returns with non-finite or absurd coordinates are dropped and counted.
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import dataclasses
import os
from typing import Any

import numpy as np

from nsmae_jax.data.schema import CAMERAS, DETECTION_CLASSES, LIDAR

_MAP_LAYERS = ('drivable_area', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area',
               'road_divider', 'lane_divider')
JPEG_QUALITY = 95
# A LiDAR return farther than this along any axis (m) is a corrupt value, not a measurement:
# nuScenes' LiDAR reaches ~100 m and ego poses lie within a few km of the map origin.
MAX_ABS_COORD = 1e4


@dataclasses.dataclass(frozen=True)
class RecordSettings:
  """What one record looks like (the builder config's content)."""
  image_height: int
  image_width: int
  num_sweeps: int  # LiDAR sweeps per key frame, the key frame included.
  bev_half_extent: float  # m; the BEV map spans [-E, E] in x and y of the LiDAR frame.
  bev_resolution: float  # m per cell.

  @property
  def bev_cells(self) -> int:
    return int(round(2 * self.bev_half_extent / self.bev_resolution))


class MissingInputError(FileNotFoundError):
  """A file the record needs is missing or unreadable; the message names it and the sample.

  `path` is the file ('' when a table row, not a file, is missing).
  """

  def __init__(self, message: str, path: str = ''):
    super().__init__(message)
    self.path = path

  def __reduce__(self):  # crosses the worker pool; OSError's default would drop `path`
    return type(self), (str(self), self.path)

  def __str__(self) -> str:
    return self.args[0]


class BadInputError(ValueError):
  """A table row or file holds values that cannot be right; names the sample and table/file."""


def _vector(row: dict[str, Any], field: str, size: int, where: str) -> np.ndarray:
  try:
    value = np.asarray(row.get(field), np.float64)
  except (TypeError, ValueError) as e:
    raise BadInputError(f'{where}: {field} {row.get(field)!r} is not numeric') from e
  if value.shape != (size,) or not np.all(np.isfinite(value)):
    raise BadInputError(f'{where}: {field} {row.get(field)!r} is not {size} finite numbers')
  return value


def check_pose(row: dict[str, Any], where: str) -> None:
  """A calibrated_sensor / ego_pose row must be a rigid transform: 3 finite translation
  numbers and a finite, non-zero quaternion (the devkit normalises it; zero has no rotation)."""
  _vector(row, 'translation', 3, where)
  if np.linalg.norm(_vector(row, 'rotation', 4, where)) < 1e-6:
    raise BadInputError(f'{where}: rotation {row["rotation"]!r} is a zero quaternion')


def check_intrinsic(row: dict[str, Any], where: str) -> np.ndarray:
  """[3,3] camera_intrinsic of a camera's calibrated_sensor row: finite, last row [0, 0, 1],
  positive focal lengths (so invertible, and points in front project in front)."""
  try:
    k = np.asarray(row.get('camera_intrinsic'), np.float64)
  except (TypeError, ValueError) as e:
    raise BadInputError(f'{where}: camera_intrinsic is not numeric') from e
  if k.shape != (3, 3) or not np.all(np.isfinite(k)):
    raise BadInputError(f'{where}: camera_intrinsic {row.get("camera_intrinsic")!r} is not a '
                        'finite 3x3 matrix')
  if not np.allclose(k[2], [0, 0, 1]) or k[0, 0] <= 0 or k[1, 1] <= 0:
    raise BadInputError(f'{where}: camera_intrinsic {k.tolist()} is not a camera matrix '
                        '(need [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0)')
  return k


def _transform(record: dict[str, Any], inverse: bool = False) -> np.ndarray:
  """4x4 float64 matrix of a calibrated_sensor / ego_pose row (devkit's transform_matrix)."""
  from nuscenes.utils.geometry_utils import transform_matrix
  from pyquaternion import Quaternion
  return transform_matrix(record['translation'], Quaternion(record['rotation']), inverse=inverse)


def _where(nusc, table: str, row: dict[str, Any], sd: dict[str, Any]) -> str:
  """Names a table row for an error: table file, row token, sensor and sample."""
  path = os.path.join(nusc.table_root, f'{table}.json')
  return (f'{path}: {table} {row["token"]} ({sd.get("channel", sd["filename"])} of sample '
          f'{sd["sample_token"]})')


def sensor_to_ego(nusc, sample_data_token: str) -> np.ndarray:
  """[4,4] sensor -> ego at the sample_data's own timestamp."""
  sd = nusc.get('sample_data', sample_data_token)
  row = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  check_pose(row, _where(nusc, 'calibrated_sensor', row, sd))
  return _transform(row)


def ego_to_global(nusc, sample_data_token: str) -> np.ndarray:
  """[4,4] ego(t of the sample_data) -> global."""
  sd = nusc.get('sample_data', sample_data_token)
  row = nusc.get('ego_pose', sd['ego_pose_token'])
  check_pose(row, _where(nusc, 'ego_pose', row, sd))
  return _transform(row)


def camera_to_lidar(nusc, cam_token: str, lidar_token: str,
                    compensate_ego_motion: bool = True) -> np.ndarray:
  """[4,4] float64 camera -> LiDAR frame, as map_pointcloud_to_image composes it (inverted).

  camera -> ego(t_cam) -> global -> ego(t_lidar) -> lidar. With compensate_ego_motion=False
  the ego pose at t_cam is replaced by the one at t_lidar (a common bug; kept to show that the
  projection test catches it).
  """
  cam_pose_token = cam_token if compensate_ego_motion else lidar_token
  cam2global = ego_to_global(nusc, cam_pose_token) @ sensor_to_ego(nusc, cam_token)
  lidar2global = ego_to_global(nusc, lidar_token) @ sensor_to_ego(nusc, lidar_token)
  return np.linalg.inv(lidar2global) @ cam2global


def resized_intrinsics(intrinsic: np.ndarray, native_hw: tuple[int, int],
                       out_hw: tuple[int, int]) -> np.ndarray:
  """[3,3] intrinsics for an image resized from native_hw to out_hw.

  Pixel centres are at integer coordinates (OpenCV convention), so a resize maps
  u -> (u + 0.5) * s - 0.5; cv2.resize samples the image the same way.
  """
  sy, sx = out_hw[0] / native_hw[0], out_hw[1] / native_hw[1]
  scale = np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1]])
  return scale @ np.asarray(intrinsic, np.float64)


def bev_patch(lidar2global: np.ndarray, half_extent: float, resolution: float
              ) -> tuple[tuple[float, float, float, float], float]:
  """(patch_box, patch_angle_deg) for NuScenesMap.get_map_mask around the LiDAR pose.

  get_map_mask puts pixel (row r, col c) at local (x, y) = (c * res - E, r * res - E) around
  the patch centre, with local x along patch_angle. The angle is the LiDAR x axis' yaw
  (as BEVFusion) and the centre is moved by half a cell along local x and y so that pixel
  (r, c) is centred at LiDAR (x, y) = (-E + (c + 0.5) res, -E + (r + 0.5) res): the DESIGN's
  cell centres. Roll and pitch of the LiDAR are ignored (the map is 2D).
  """
  rot, trans = lidar2global[:3, :3], lidar2global[:3, 3]
  yaw = np.arctan2(rot[1, 0], rot[0, 0])
  c, s = np.cos(yaw), np.sin(yaw)
  half = 0.5 * resolution
  centre = trans[:2] + np.array([c * half - s * half, s * half + c * half])
  size = 2.0 * half_extent
  return (float(centre[0]), float(centre[1]), size, size), float(np.degrees(yaw))


def map_mask_to_bev(mask: np.ndarray) -> np.ndarray:
  """get_map_mask's [7, rows=y, cols=x] over _MAP_LAYERS -> bev_map uint8 [6, x, y]."""
  mask = np.asarray(mask, np.uint8).transpose(0, 2, 1)
  divider = np.maximum(mask[5], mask[6])
  return np.concatenate([mask[:5], divider[None]], axis=0)


def bev_map(nusc_map, lidar2global: np.ndarray, settings: RecordSettings) -> np.ndarray:
  """uint8 [6, n, n] map masks in the LiDAR frame: bev_map[c, i, j] is the cell centred at
  x = -E + (i + 0.5) r, y = -E + (j + 0.5) r."""
  patch_box, angle = bev_patch(lidar2global, settings.bev_half_extent, settings.bev_resolution)
  n = settings.bev_cells
  mask = nusc_map.get_map_mask(patch_box, angle, list(_MAP_LAYERS), (n, n))
  return map_mask_to_bev(mask)


def boxes_in_lidar(nusc, lidar_token: str, lidar2ego: np.ndarray, ego2global: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Detection boxes of the key frame in the LiDAR frame.

  Returns boxes float32 [M, 9] (x, y, z, l, w, h, yaw, vx, vy; yaw of the length axis about
  z from LiDAR x; velocity in m/s rotated into the LiDAR frame, 0 where the devkit gives NaN,
  i.e. single-annotation instances) and labels int32 [M] (index into DETECTION_CLASSES).
  Annotations whose category is not a detection class are dropped.
  """
  from nuscenes.eval.detection.utils import category_to_detection_name
  _, boxes, _ = nusc.get_sample_data(lidar_token)
  global2lidar_rot = (ego2global[:3, :3] @ lidar2ego[:3, :3]).T
  rows, labels = [], []
  for box in boxes:
    name = category_to_detection_name(box.name)
    if name is None:
      continue
    velocity = np.nan_to_num(nusc.box_velocity(box.token), nan=0.0)
    velocity = global2lidar_rot @ velocity
    w, l, h = box.wlh
    rows.append([*box.center, l, w, h, box.orientation.yaw_pitch_roll[0], velocity[0],
                 velocity[1]])
    labels.append(DETECTION_CLASSES.index(name))
  return (np.asarray(rows, np.float32).reshape(-1, 9), np.asarray(labels, np.int32))


def _require_file(path: str, what: str, sample_token: str) -> None:
  if not os.path.isfile(path):
    raise MissingInputError(f'missing {what} file {path} (sample {sample_token})', path)


def valid_points(points: np.ndarray) -> np.ndarray:
  """bool [N] of points [N, 5]: every value finite and |x|, |y|, |z| <= MAX_ABS_COORD."""
  return (np.all(np.isfinite(points), axis=1)
          & np.all(np.abs(points[:, :3]) <= MAX_ABS_COORD, axis=1))


def load_points(nusc, sample: dict[str, Any], num_sweeps: int) -> tuple[np.ndarray, int]:
  """(float32 [N, 5] points, number dropped): key frame + sweeps in the key frame LiDAR frame.

  Points are (x, y, z, intensity, time lag s), exactly from_file_multisweep (which also drops
  returns within 1 m of the sensor), minus returns that are not valid_points (NaN, inf or
  farther than MAX_ABS_COORD in a file: corrupt values, never measurements).
  """
  from nuscenes.utils.data_classes import LidarPointCloud
  lidar = nusc.get('sample_data', sample['data'][LIDAR])
  _require_file(os.path.join(nusc.dataroot, lidar['filename']), 'LiDAR', sample['token'])
  try:
    cloud, times = LidarPointCloud.from_file_multisweep(nusc, sample, LIDAR, LIDAR,
                                                        nsweeps=num_sweeps)
  except (OSError, ValueError) as e:
    name = getattr(e, 'filename', None) or str(e)
    what = 'missing' if isinstance(e, FileNotFoundError) else 'unreadable'
    raise MissingInputError(f'{what} LiDAR sweep {name} (sample {sample["token"]})',
                            getattr(e, 'filename', None) or '') from e
  with np.errstate(invalid='ignore'):
    points = np.concatenate([cloud.points.T, times.T], axis=1)
    keep = valid_points(points)
  return points[keep].astype(np.float32), int(np.count_nonzero(~keep))


def load_image(path: str, settings: RecordSettings, sample_token: str,
               expected_hw: tuple[int, int] | None = None) -> tuple[bytes, tuple[int, int]]:
  """(JPEG bytes at the stored size, native (h, w)) of one camera image.

  expected_hw: the sample_data row's (height, width). An image of another size is a
  BadInputError rather than a resize: the row's camera_intrinsic may be for either size, and
  guessing wrong would shift every projection silently.
  """
  import cv2
  _require_file(path, 'camera image', sample_token)
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise MissingInputError(f'unreadable camera image {path} (sample {sample_token})', path)
  native = image.shape[:2]
  if expected_hw is not None and tuple(native) != tuple(expected_hw):
    raise BadInputError(f'camera image {path} (sample {sample_token}) is {native[1]}x'
                        f'{native[0]} px but its sample_data row says {expected_hw[1]}x'
                        f'{expected_hw[0]}')
  out_hw = (settings.image_height, settings.image_width)
  if native != out_hw:
    image = cv2.resize(image, out_hw[::-1], interpolation=cv2.INTER_AREA)
  ok, data = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise RuntimeError(f'JPEG encoding failed for {path} (sample {sample_token})')
  return data.tobytes(), native


def make_record(nusc, nusc_map, sample_token: str, settings: RecordSettings) -> dict[str, Any]:
  """The record of DESIGN.md for one key frame (numpy values, JPEG bytes for images), plus
  `invalid_points` (returns dropped by load_points; record_io.EXTRA_KEYS)."""
  sample = nusc.get('sample', sample_token)
  scene = nusc.get('scene', sample['scene_token'])
  lidar_token = sample['data'][LIDAR]
  lidar2ego = sensor_to_ego(nusc, lidar_token)
  ego2global = ego_to_global(nusc, lidar_token)
  images, intrinsics, cam2lidar = [], [], []
  for cam in CAMERAS:
    if cam not in sample['data']:
      raise MissingInputError(f'sample {sample_token} has no {cam} key frame')
    cam_token = sample['data'][cam]
    sd = nusc.get('sample_data', cam_token)
    calib = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
    intrinsic = check_intrinsic(calib, _where(nusc, 'calibrated_sensor', calib, sd))
    data, native = load_image(os.path.join(nusc.dataroot, sd['filename']), settings,
                              sample_token, (sd['height'], sd['width']))
    images.append(data)
    intrinsics.append(resized_intrinsics(intrinsic, native,
                                         (settings.image_height, settings.image_width)))
    cam2lidar.append(camera_to_lidar(nusc, cam_token, lidar_token))
  boxes, labels = boxes_in_lidar(nusc, lidar_token, lidar2ego, ego2global)
  points, invalid_points = load_points(nusc, sample, settings.num_sweeps)
  return {
      'token': sample_token,
      'scene_name': scene['name'],
      'timestamp': np.int64(sample['timestamp']),
      'images': images,
      'intrinsics': np.asarray(intrinsics, np.float32),
      'cam2lidar': np.asarray(cam2lidar, np.float32),
      'lidar2ego': lidar2ego.astype(np.float32),
      'ego2global': ego2global.astype(np.float32),
      'points': points,
      'bev_map': bev_map(nusc_map, ego2global @ lidar2ego, settings),
      'boxes': boxes,
      'box_labels': labels,
      'invalid_points': invalid_points,  # not a feature: for conversion_stats.json
  }
