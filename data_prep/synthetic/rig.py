"""Constants of the synthetic world: the sensor rig, object classes and surface materials.

Frames follow nuScenes: the ego frame is x forward, y left, z up with z = 0 on the ground;
LIDAR_TOP is x right, y forward, z up; a camera is x right, y down, z along the optical axis.
"""

from __future__ import annotations

import math

import numpy as np

LOCATIONS = ('singapore-onenorth', 'singapore-hollandvillage', 'singapore-queenstown',
             'boston-seaport')

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
LIDAR = 'LIDAR_TOP'

# Real rig at 1600x900: (yaw deg, translation in ego frame m, focal px, principal point px).
CAMERA_RIG = {
    'CAM_FRONT': (0.0, (1.70, 0.016, 1.51), 1266.4, (816.3, 491.5)),
    'CAM_FRONT_RIGHT': (-55.0, (1.55, -0.493, 1.49), 1260.8, (807.9, 495.3)),
    'CAM_FRONT_LEFT': (55.0, (1.52, 0.495, 1.51), 1272.6, (826.6, 479.8)),
    'CAM_BACK': (180.0, (0.03, 0.008, 1.57), 809.2, (829.2, 481.8)),
    'CAM_BACK_LEFT': (110.0, (1.04, 0.481, 1.56), 1256.7, (817.8, 451.9)),
    'CAM_BACK_RIGHT': (-110.0, (1.04, -0.480, 1.56), 1259.5, (807.3, 501.2)),
}
NATIVE_WIDTH, NATIVE_HEIGHT = 1600, 900
# The LiDAR spins at 20 Hz; a camera fires when the sweep passes its optical axis, so its
# timestamp trails the LiDAR's by the time the spin needs to reach its yaw (real rig: 0-50 ms).
LIDAR_PERIOD_US = 50_000
LIDAR_START_YAW_DEG = 90.0  # ego-frame azimuth where a sweep starts (pointing left).

LIDAR_TRANSLATION = (0.943, 0.0, 1.84)
LIDAR_YAW_DEG = -90.0
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
LIDAR_AZIMUTH_STEPS = 1084
LIDAR_MAX_RANGE = 100.0
LIDAR_MIN_RANGE = 1.0
LIDAR_RANGE_NOISE = 0.01  # metres, std of the simulated range noise.


def rot_z(yaw: float) -> np.ndarray:
  """[3, 3] rotation about z by `yaw` radians."""
  c, s = math.cos(yaw), math.sin(yaw)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_quaternion(yaw: float) -> list:
  """nuScenes quaternion [w, x, y, z] of a rotation about z by `yaw` radians."""
  return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


# Camera frame (x right, y down, z forward) -> ego-aligned frame, before the yaw.
CAM_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def camera_rotation(channel: str) -> np.ndarray:
  """[3, 3] rotation camera frame -> ego frame."""
  return rot_z(math.radians(CAMERA_RIG[channel][0])) @ CAM_AXES


def camera_intrinsic(channel: str, width: int, height: int) -> np.ndarray:
  """[3, 3] intrinsics for an image of width x height (the native rig scaled)."""
  _, _, focal, (cx, cy) = CAMERA_RIG[channel]
  sx, sy = width / NATIVE_WIDTH, height / NATIVE_HEIGHT
  return np.array([[focal * sx, 0.0, cx * sx], [0.0, focal * sy, cy * sy], [0.0, 0.0, 1.0]])


def camera_offset_us(channel: str) -> int:
  """Camera timestamp minus the LiDAR sweep's timestamp, microseconds (the spin turns clockwise)."""
  yaw = CAMERA_RIG[channel][0]
  turn = (LIDAR_START_YAW_DEG - yaw) % 360.0
  return int(round(turn / 360.0 * LIDAR_PERIOD_US))


def quaternion_from_matrix(rot: np.ndarray) -> list:
  """nuScenes quaternion [w, x, y, z] of a [3, 3] rotation matrix."""
  from pyquaternion import Quaternion  # pylint: disable=import-outside-toplevel
  q = Quaternion(matrix=rot, atol=1e-7)
  return [float(v) for v in q.elements]


# ----- object classes: (nuScenes category, detection class, mean size [w, l, h] m, box kind)
CLASSES = {
    'car': ('vehicle.car', (1.95, 4.6, 1.73), 'vehicle'),
    'truck': ('vehicle.truck', (2.5, 6.9, 2.8), 'vehicle'),
    'bus': ('vehicle.bus.rigid', (2.95, 11.2, 3.5), 'vehicle'),
    'trailer': ('vehicle.trailer', (2.9, 12.3, 3.9), 'vehicle'),
    'construction_vehicle': ('vehicle.construction', (2.8, 6.5, 3.2), 'vehicle'),
    'pedestrian': ('human.pedestrian.adult', (0.67, 0.73, 1.77), 'pedestrian'),
    'motorcycle': ('vehicle.motorcycle', (0.77, 2.1, 1.47), 'cycle'),
    'bicycle': ('vehicle.bicycle', (0.6, 1.7, 1.28), 'cycle'),
    'traffic_cone': ('movable_object.trafficcone', (0.41, 0.41, 1.07), 'cone'),
    'barrier': ('movable_object.barrier', (2.5, 0.5, 0.98), 'barrier'),
}
CLASS_NAMES = tuple(CLASSES)

ATTRIBUTES = ('vehicle.moving', 'vehicle.stopped', 'vehicle.parked', 'cycle.with_rider',
              'cycle.without_rider', 'pedestrian.sitting_lying_down', 'pedestrian.standing',
              'pedestrian.moving')
VISIBILITY = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))

# ----- surfaces. Ground materials index the town raster; box kinds index BOX_KINDS.
# name: (albedo RGB 0-1, LiDAR intensity, raised 0.15 m above the road)
GROUND_MATERIALS = (
    ('asphalt', (0.33, 0.33, 0.35), 6.0, False),
    ('lane_marking', (0.92, 0.92, 0.88), 120.0, False),
    ('road_divider', (0.95, 0.78, 0.15), 110.0, False),
    ('zebra', (0.95, 0.95, 0.95), 130.0, False),
    ('stop_line', (0.97, 0.97, 0.97), 140.0, False),
    ('sidewalk', (0.68, 0.62, 0.56), 32.0, True),
    ('grass', (0.30, 0.50, 0.20), 18.0, True),
    ('plaza', (0.62, 0.58, 0.50), 40.0, True),
    ('carpark', (0.48, 0.42, 0.46), 12.0, False),
    ('curb', (0.75, 0.75, 0.72), 50.0, True),
)
MATERIAL_ID = {name: i for i, (name, *_) in enumerate(GROUND_MATERIALS)}
MATERIAL_ALBEDO = np.array([m[1] for m in GROUND_MATERIALS], np.float32)
MATERIAL_INTENSITY = np.array([m[2] for m in GROUND_MATERIALS], np.float32)
MATERIAL_RAISED = np.array([m[3] for m in GROUND_MATERIALS], bool)
CURB_HEIGHT = 0.15

# Box kinds for ray casting: (LiDAR intensity, surface pattern used by the camera shader).
BOX_KINDS = ('building', 'tree_trunk', 'tree_crown', 'pole', 'vehicle', 'pedestrian',
             'cycle', 'cone', 'barrier')
BOX_KIND_ID = {name: i for i, name in enumerate(BOX_KINDS)}
BOX_INTENSITY = np.array([25.0, 15.0, 10.0, 60.0, 45.0, 20.0, 36.5, 90.0, 70.0], np.float32)
INTENSITY_NOISE = 1.5  # uniform +-, so sidewalk (32) is told apart from every other surface.
