"""What a record and a batch hold: sensor names, class lists and counts (DESIGN.md).

Every module that needs a camera name, a map class or a detection class imports it from here;
nothing else repeats these lists. Pure Python: importable anywhere (the converter, the input
pipeline, the models, the heads, the notebooks) without TensorFlow, JAX or the devkit.
"""

from __future__ import annotations

# nuScenes camera order of every [6, ...] array in a record or batch.
CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
LIDAR = 'LIDAR_TOP'
NUM_CAMERAS = len(CAMERAS)

# BEVFusion's map classes, in the order of bev_map's channel axis; `divider` is the union of the
# devkit's road_divider and lane_divider layers.
MAP_CLASSES = ('drivable_area', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area', 'divider')
NUM_MAP_CLASSES = len(MAP_CLASSES)
MAP_LOCATIONS = ('singapore-onenorth', 'singapore-hollandvillage', 'singapore-queenstown',
                 'boston-seaport')

# The 10 nuScenes detection classes (nuscenes.eval.detection.constants.DETECTION_NAMES, same
# order; tests/test_schema.py checks it against the devkit); a box label indexes this tuple.
DETECTION_CLASSES = ('car', 'truck', 'bus', 'trailer', 'construction_vehicle', 'pedestrian',
                     'motorcycle', 'bicycle', 'traffic_cone', 'barrier')
NUM_DETECTION_CLASSES = len(DETECTION_CLASSES)

# Per-point features of `points` [N, 5]: x, y, z (LiDAR frame, m), intensity, time lag (s).
POINT_FEATURES = ('x', 'y', 'z', 'intensity', 'time_lag')
# Per-box features of `boxes` [M, 9] (LiDAR frame).
BOX_FEATURES = ('x', 'y', 'z', 'l', 'w', 'h', 'yaw', 'vx', 'vy')
