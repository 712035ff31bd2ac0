"""nuScenes detection results: LiDAR-frame boxes -> the devkit's result JSON -> DetectionEval.

Box layout in: [K, 9] (x, y, z, l, w, h, yaw, vx, vy) in the key frame's LIDAR_TOP frame, as the
batch's `boxes`. Out, per the nuScenes detection format: translation (global, m), size [w, l, h]
(the devkit's wlh order), rotation quaternion [w, x, y, z] (global yaw only), velocity [vx, vy]
(global, m/s), detection_name, detection_score, attribute_name.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from nsmae_jax.data.schema import DETECTION_CLASSES

# Above this speed (m/s) an object counts as moving when choosing its attribute (CenterPoint's
# rule for nuScenes submissions).
MOVING_SPEED = 0.2
# (attribute when moving, when not) per class; '' for classes without attributes (the
# evaluator accepts '' and ignores attributes for cones and barriers).
_ATTRIBUTES = {
    'car': ('vehicle.moving', 'vehicle.parked'),
    'truck': ('vehicle.moving', 'vehicle.parked'),
    'bus': ('vehicle.moving', 'vehicle.parked'),
    'trailer': ('vehicle.moving', 'vehicle.parked'),
    'construction_vehicle': ('vehicle.moving', 'vehicle.parked'),
    'pedestrian': ('pedestrian.moving', 'pedestrian.standing'),
    'motorcycle': ('cycle.with_rider', 'cycle.without_rider'),
    'bicycle': ('cycle.with_rider', 'cycle.without_rider'),
    'traffic_cone': ('', ''),
    'barrier': ('', ''),
}
# Devkit metric names -> our short eval keys.
_TP_KEYS = {'trans_err': 'ate', 'scale_err': 'ase', 'orient_err': 'aoe', 'vel_err': 'ave',
            'attr_err': 'aae'}


def attribute_name(detection_name: str, speed: float) -> str:
  """A sensible attribute from the class and the predicted speed (m/s)."""
  moving, still = _ATTRIBUTES[detection_name]
  return moving if speed > MOVING_SPEED else still


def boxes_to_global(boxes: np.ndarray, lidar2ego: np.ndarray, ego2global: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """LiDAR-frame boxes [K, 9] -> (centre [K, 3], yaw [K], velocity [K, 2]) in the global frame.

  The yaw is the heading of the box's length axis after the LiDAR-to-global rotation, projected
  on the ground plane (nuScenes boxes carry yaw only). float64 throughout.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
  lidar2global = np.asarray(ego2global, np.float64) @ np.asarray(lidar2ego, np.float64)
  rot, trans = lidar2global[:3, :3], lidar2global[:3, 3]
  centre = boxes[:, :3] @ rot.T + trans
  heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], -1) @ rot.T
  yaw = np.arctan2(heading[:, 1], heading[:, 0])
  velocity = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], -1) @ rot.T
  return centre, yaw, velocity[:, :2]


def sample_results(sample_token: str, boxes: np.ndarray, scores: np.ndarray,
                   labels: np.ndarray, lidar2ego: np.ndarray, ego2global: np.ndarray
                   ) -> list[dict[str, Any]]:
  """The result entries of one sample: boxes [K, 9] (LiDAR frame), scores [K], labels [K]
  (DETECTION_CLASSES index); lidar2ego, ego2global [4, 4] of the sample's LiDAR key frame."""
  centre, yaw, velocity = boxes_to_global(boxes, lidar2ego, ego2global)
  out = []
  for k in range(len(centre)):
    name = DETECTION_CLASSES[int(labels[k])]
    l, w, h = (float(v) for v in np.asarray(boxes[k][3:6], np.float64))
    vx, vy = (float(v) for v in velocity[k])
    out.append({
        'sample_token': sample_token,
        'translation': [float(v) for v in centre[k]],
        'size': [w, l, h],
        'rotation': [math.cos(yaw[k] / 2), 0.0, 0.0, math.sin(yaw[k] / 2)],
        'velocity': [vx, vy],
        'detection_name': name,
        'detection_score': float(scores[k]),
        'attribute_name': attribute_name(name, math.hypot(vx, vy)),
    })
  return out


def write_results(path: str, results: Mapping[str, Sequence[dict]],
                  meta: Mapping[str, bool] | None = None) -> str:
  """Writes {sample_token: [entries]} as a nuScenes detection submission JSON; returns path."""
  meta = dict(meta or dict(use_camera=True, use_lidar=True, use_radar=False, use_map=False,
                           use_external=False))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'meta': meta, 'results': {k: list(v) for k, v in results.items()}}, f)
  return path


@functools.lru_cache(maxsize=2)
def load_nuscenes(dataroot: str, version: str):
  """The devkit's NuScenes for a dataroot (cached: real trainval takes ~30 s to load)."""
  from nuscenes import NuScenes  # pylint: disable=import-outside-toplevel
  return NuScenes(version=version, dataroot=dataroot, verbose=False)


def split_sample_tokens(dataroot: str, version: str, eval_set: str) -> list[str]:
  """Sample tokens of the official split `eval_set` present in the dataroot (what
  DetectionEval requires predictions for)."""
  from nuscenes.utils.splits import create_splits_scenes  # pylint: disable=import-outside-toplevel
  nusc = load_nuscenes(dataroot, version)
  scenes = set(create_splits_scenes()[eval_set])
  return [s['token'] for s in nusc.sample
          if nusc.get('scene', s['scene_token'])['name'] in scenes]


def detection_config(config_name: str = 'detection_cvpr_2019', max_range: float | None = None):
  """The devkit's DetectionConfig `config_name`; max_range (m) caps every class's evaluation
  range (the devkit drops ground truth and predictions farther from the ego vehicle), e.g. to
  score only what a BEV grid smaller than the official 40-50 m ranges can see (a diagnostic:
  the official score keeps config_name's ranges)."""
  # pylint: disable=import-outside-toplevel
  from nuscenes.eval.common.config import config_factory
  from nuscenes.eval.detection.data_classes import DetectionConfig
  cfg = config_factory(config_name)
  if max_range is None:
    return cfg
  if max_range <= 0:
    raise ValueError(f'max_range must be positive (m), got {max_range}')
  d = cfg.serialize()
  d['class_range'] = {k: min(float(v), float(max_range)) for k, v in d['class_range'].items()}
  return DetectionConfig.deserialize(d)


def zero_velocity_results(results_path: str, out_path: str) -> str:
  """Copies a detection result JSON with every velocity set to 0 and the attribute chosen for a
  standing object: what a detector that never guesses motion would score (diagnostic for
  protocols whose input carries no motion, e.g. one LiDAR sweep). Returns out_path."""
  with open(results_path) as f:
    sub = json.load(f)
  for entries in sub['results'].values():
    for e in entries:
      e['velocity'] = [0.0, 0.0]
      e['attribute_name'] = attribute_name(e['detection_name'], 0.0)
  return write_results(out_path, sub['results'], sub.get('meta'))


def evaluate(results_path: str, dataroot: str, version: str, eval_set: str = 'val',
             output_dir: str | None = None, config_name: str = 'detection_cvpr_2019',
             max_range: float | None = None) -> dict[str, float]:
  """Scores a result JSON with the devkit's DetectionEval; returns flat metrics.

  Keys: 'map', 'nds', 'mate', 'mase', 'maoe', 'mave', 'maae', and per class 'ap_<class>' (mean
  over the distance thresholds) and '<tp>_<class>' (tp in ate, ase, aoe, ave, aae; left out
  where the devkit defines none, e.g. attributes of cones). Also writes metrics_summary.json to
  output_dir (default: beside the results). max_range: see detection_config (None = the
  official ranges).
  """
  from nuscenes.eval.detection.evaluate import DetectionEval  # pylint: disable=C0415
  output_dir = output_dir or os.path.dirname(os.path.abspath(results_path))
  os.makedirs(output_dir, exist_ok=True)
  evaluator = DetectionEval(load_nuscenes(dataroot, version),
                            detection_config(config_name, max_range),
                            results_path, eval_set, output_dir=output_dir, verbose=False)
  metrics, _ = evaluator.evaluate()
  serialized = metrics.serialize()
  with open(os.path.join(output_dir, 'metrics_summary.json'), 'w') as f:
    json.dump(serialized, f, indent=1)
  return summarize(serialized)


def summarize(serialized: Mapping[str, Any]) -> dict[str, float]:
  """DetectionMetrics.serialize() -> flat metrics (see evaluate)."""
  out = {'map': float(serialized['mean_ap']), 'nds': float(serialized['nd_score'])}
  for name, key in _TP_KEYS.items():
    out[f'm{key}'] = float(serialized['tp_errors'][name])
  for cls in DETECTION_CLASSES:
    out[f'ap_{cls}'] = float(serialized['mean_dist_aps'][cls])
    for name, key in _TP_KEYS.items():
      value = float(serialized['label_tp_errors'][cls][name])
      if np.isfinite(value):
        out[f'{key}_{cls}'] = value
  return out


def format_table(summary: Mapping[str, float]) -> str:
  """Per-class AP and TP errors plus the means, as the devkit prints them."""
  cols = ('ap',) + tuple(_TP_KEYS.values())
  lines = ['class'.ljust(22) + ''.join(c.upper().rjust(8) for c in cols)]
  for cls in DETECTION_CLASSES:
    cells = [summary.get(f'{c}_{cls}') for c in cols]
    lines.append(cls.ljust(22) + ''.join(
        ('nan' if v is None else f'{v:.3f}').rjust(8) for v in cells))
  lines.append(f'mAP {summary["map"]:.4f}  NDS {summary["nds"]:.4f}  ' + '  '.join(
      f'm{k.upper()} {summary["m" + k]:.4f}' for k in _TP_KEYS.values()))
  return '\n'.join(lines)
