"""One scene end to end: simulate its sensors, write its files, return its table rows.

Runs in a worker process; everything is a function of (seed, scene index, settings), so the
output does not depend on which worker ran it or in which order.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import time

import numpy as np
from PIL import Image

from data_prep.synthetic import rig, sensors
from data_prep.synthetic.devkit_count import SortedPoints, box_in_sensor
from data_prep.synthetic.tables import token
from data_prep.synthetic.town import build_town
from data_prep.synthetic.traffic import build_scene

T0_US = 1_533_000_000_000_000  # 2018-07-31, like the real logs
SCENE_GAP_US = 3_600_000_000
KEY_PERIOD_US = 500_000
ANNOTATION_RANGE = 60.0  # metres from the ego: objects annotated at a key frame
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
  num_scenes: int
  val_scenes: int
  frames_per_scene: int
  sweeps_per_frame: int
  image_width: int
  image_height: int


def scene_names(num_scenes: int, val_scenes: int) -> list:
  """Names of the world's scenes: official v1.0-trainval names of the split each belongs to.

  The devkit's DetectionEval picks the ground truth of a split by the hard-coded official scene
  names (nuscenes.utils.splits.create_splits_scenes), not by splits.json, so the train scenes
  take the first official 'train' names and the last `val_scenes` scenes the first official
  'val' names (e.g. scene-0003). At most 700 train and 150 val scenes.
  """
  # The devkit import costs seconds: done once, in the main process, never in a scene worker.
  from nuscenes.utils import splits  # pylint: disable=import-outside-toplevel
  official = splits.create_splits_scenes()
  num_train = num_scenes - val_scenes
  if num_train > len(official['train']) or val_scenes > len(official['val']):
    raise ValueError(f'at most {len(official["train"])} train and {len(official["val"])} val '
                     f'scenes have official names, asked for {num_train} and {val_scenes}')
  return official['train'][:num_train] + official['val'][:val_scenes]


def log_token(seed: int, index: int) -> str:
  return token(f'{seed}/{index}', 'log')


def location_index(seed: int, index: int) -> int:
  return (seed + index) % len(rig.LOCATIONS)


def sweep_times_us(settings: Settings, index: int) -> list:
  """LiDAR timestamps of the scene: sweeps_per_frame lead-in sweeps, then key frames with
  sweeps_per_frame sweeps between consecutive ones."""
  s = settings.sweeps_per_frame
  n = s + (settings.frames_per_scene - 1) * (s + 1) + 1
  t0 = T0_US + index * SCENE_GAP_US
  return [t0 + int(round(k * KEY_PERIOD_US / (s + 1))) for k in range(n)]


@functools.lru_cache(maxsize=4)
def cached_town(seed: int, loc: int):
  return build_town(seed, loc)


def build_world(settings: Settings, index: int) -> sensors.World:
  """The scene's world, reconstructed from (seed, scene index)."""
  town = cached_town(settings.seed, location_index(settings.seed, index))
  times = sweep_times_us(settings, index)
  duration = (times[-1] - times[0] + rig.LIDAR_PERIOD_US) / 1e6 + 1.0
  return sensors.World(town, build_scene(town, settings.seed, index, duration))


def scene_time(settings: Settings, index: int, t_us: int) -> float:
  """Simulation time in seconds of an absolute timestamp."""
  return (t_us - (T0_US + index * SCENE_GAP_US)) / 1e6


def _pose_row(tok, rot, trans, t_us):
  return dict(token=tok, translation=[float(v) for v in trans],
              rotation=rig.quaternion_from_matrix(rot), timestamp=int(t_us))


def _jpeg(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


class StageTimer:
  """CPU seconds (this process) per named stage, summed over calls."""

  def __init__(self):
    self.seconds = {}
    self._stage, self._start = None, 0.0

  def __call__(self, stage: str) -> 'StageTimer':
    self._stage = stage
    return self

  def __enter__(self):
    self._start = time.process_time()

  def __exit__(self, *exc):
    self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.process_time() - self._start


def simulate_scene(out: str, settings: Settings, index: int, name: str,
                   timer: StageTimer | None = None) -> dict:
  """Simulates scene `index` (called `name`, see scene_names), writes its sample/sweep files
  under `out`, returns its table rows (dict table name -> list of rows). `timer` collects CPU
  seconds per stage ('world', 'lidar', 'camera', 'jpeg', 'annotations')."""
  timer = timer or StageTimer()
  seed = settings.seed
  with timer('world'):
    world = build_world(settings, index)
  key = f'{seed}/{index}'
  rows = {k: [] for k in ('log', 'scene', 'sample', 'sample_data', 'ego_pose', 'calibrated_sensor',
                          'instance', 'sample_annotation')}
  loc = location_index(seed, index)
  log_tok = log_token(seed, index)
  rows['log'].append(dict(token=log_tok, logfile=f'{name}-log', vehicle='synth-car',
                          date_captured='2018-07-31', location=rig.LOCATIONS[loc]))
  calib = {}
  lidar_rot = rig.rot_z(math.radians(rig.LIDAR_YAW_DEG))
  calib[rig.LIDAR] = dict(token=token(key, 'calib', rig.LIDAR), sensor_token=token('sensor', rig.LIDAR),
                          translation=list(rig.LIDAR_TRANSLATION),
                          rotation=rig.quaternion_from_matrix(lidar_rot), camera_intrinsic=[])
  for ch in rig.CAMERAS:
    k = rig.camera_intrinsic(ch, settings.image_width, settings.image_height)
    calib[ch] = dict(token=token(key, 'calib', ch), sensor_token=token('sensor', ch),
                     translation=list(rig.CAMERA_RIG[ch][1]),
                     rotation=rig.quaternion_from_matrix(rig.camera_rotation(ch)),
                     camera_intrinsic=[[float(v) for v in r] for r in k])
  rows['calibrated_sensor'] = list(calib.values())

  times = sweep_times_us(settings, index)
  s = settings.sweeps_per_frame
  key_sweeps = [s + f * (s + 1) for f in range(settings.frames_per_scene)]
  sample_toks = [token(key, 'sample', f) for f in range(settings.frames_per_scene)]
  scene_tok = token(key, 'scene')
  for f, tok in enumerate(sample_toks):
    rows['sample'].append(dict(token=tok, timestamp=times[key_sweeps[f]], scene_token=scene_tok,
                               prev=sample_toks[f - 1] if f else '',
                               next=sample_toks[f + 1] if f + 1 < len(sample_toks) else ''))
  rows['scene'].append(dict(token=scene_tok, log_token=log_tok, nbr_samples=len(sample_toks),
                            first_sample_token=sample_toks[0], last_sample_token=sample_toks[-1],
                            name=name, description=f'synthetic drive in {rig.LOCATIONS[loc]}'))

  # LiDAR: every sweep, chained by prev/next; key frames in samples/, the rest in sweeps/.
  lidar_toks = [token(key, 'lidar', n) for n in range(len(times))]
  key_hits = {}
  for d in ('samples', 'sweeps'):
    for ch in (rig.LIDAR,) + (rig.CAMERAS if d == 'samples' else ()):
      os.makedirs(os.path.join(out, d, ch), exist_ok=True)
  for n, t_us in enumerate(times):
    t = scene_time(settings, index, t_us)
    with timer('lidar'):
      points, hits, boxes = sensors.lidar_sweep(world, t, np.random.default_rng([seed, index, n]))
    is_key = n in key_sweeps
    f = key_sweeps.index(n) if is_key else min(n // (s + 1), settings.frames_per_scene - 1)
    fname = f"{'samples' if is_key else 'sweeps'}/{rig.LIDAR}/{name}__{rig.LIDAR}__{t_us}.pcd.bin"
    points.tofile(os.path.join(out, fname))
    r_ego, t_ego = world.ego_matrix(t)
    rows['ego_pose'].append(_pose_row(lidar_toks[n], r_ego, t_ego, t_us))
    rows['sample_data'].append(dict(
        token=lidar_toks[n], sample_token=sample_toks[f], ego_pose_token=lidar_toks[n],
        calibrated_sensor_token=calib[rig.LIDAR]['token'], timestamp=t_us, fileformat='pcd',
        is_key_frame=is_key, height=0, width=0, filename=fname,
        prev=lidar_toks[n - 1] if n else '', next=lidar_toks[n + 1] if n + 1 < len(times) else ''))
    if is_key:
      key_hits[f] = (points, hits, boxes, rows['ego_pose'][-1])

  # Cameras: one image per key frame, fired as the LiDAR spin passes the camera.
  for ch in rig.CAMERAS:
    toks = [token(key, ch, f) for f in range(settings.frames_per_scene)]
    for f in range(settings.frames_per_scene):
      t_us = times[key_sweeps[f]] + rig.camera_offset_us(ch)
      t = scene_time(settings, index, t_us)
      with timer('camera'):
        rgb, _ = sensors.camera_render(world, ch, t, settings.image_width, settings.image_height)
      fname = f'samples/{ch}/{name}__{ch}__{t_us}.jpg'
      with timer('jpeg'), open(os.path.join(out, fname), 'wb') as fh:
        fh.write(_jpeg(rgb))
      r_ego, t_ego = world.ego_matrix(t)
      rows['ego_pose'].append(_pose_row(toks[f], r_ego, t_ego, t_us))
      rows['sample_data'].append(dict(
          token=toks[f], sample_token=sample_toks[f], ego_pose_token=toks[f],
          calibrated_sensor_token=calib[ch]['token'], timestamp=t_us, fileformat='jpg',
          is_key_frame=True, height=settings.image_height, width=settings.image_width,
          filename=fname, prev=toks[f - 1] if f else '',
          next=toks[f + 1] if f + 1 < settings.frames_per_scene else ''))

  # Annotations: objects within range at a key frame, tracks contiguous from first to last.
  with timer('annotations'):
    _annotate(rows, world, settings, key, key_hits, sample_toks, calib[rig.LIDAR])
  return rows


def _annotate(rows: dict, world: sensors.World, settings: Settings, key: str, key_hits: dict,
              sample_toks: list, cs: dict) -> None:
  """Appends the scene's instance and sample_annotation rows."""
  objects = world.scene.objects
  nframes = settings.frames_per_scene
  in_range = np.zeros((nframes, len(objects)), bool)
  for f in range(nframes):
    _, _, boxes, pose = key_hits[f]
    obj = boxes.instance >= 0
    d = np.hypot(boxes.centre[obj, 0] - pose['translation'][0], boxes.centre[obj, 1] - pose['translation'][1])
    in_range[f, boxes.instance[obj][d < ANNOTATION_RANGE]] = True
  sorted_points = {f: SortedPoints(key_hits[f][0][:, :3]) for f in range(nframes)}
  for i in np.nonzero(in_range.any(0))[0]:
    frames = np.nonzero(in_range[:, i])[0]
    o = objects[i]
    inst_tok = token(key, 'instance', i)
    annotated = []  # (frame, box index, translation, size, rotation, num_lidar_pts)
    for f in range(int(frames[0]), int(frames[-1]) + 1):
      _, _, boxes, pose = key_hits[f]
      b = int(np.nonzero(boxes.instance == i)[0][0])
      translation = [float(v) for v in boxes.centre[b]]
      size = [float(v) for v in boxes.size[b]]
      rotation = [float(v) for v in rig.yaw_quaternion(float(boxes.yaw[b]))]
      # num_lidar_pts exactly as the devkit counts it on the stored key-frame sweep.
      npts = sorted_points[f].count_in_box(*box_in_sensor(translation, size, rotation, pose, cs))
      # Only objects the key-frame LiDAR saw are annotated: DetectionEval drops ground truth
      # with no LiDAR/radar points, so a box without points would be a label that no evaluation
      # counts (and a false positive when a detector, rightly, reports it).
      if npts > 0:
        annotated.append((f, b, translation, size, rotation, npts))
    if not annotated:
      continue
    ann_toks = [token(key, 'ann', i, a[0]) for a in annotated]
    for j, (f, b, translation, size, rotation, npts) in enumerate(annotated):
      _, hits, boxes, _ = key_hits[f]
      seen = int((hits.hit == b).sum())
      frac = seen / hits.box_any[b] if hits.box_any[b] else 0.0
      vis = '1' if frac < 0.4 else '2' if frac < 0.6 else '3' if frac < 0.8 else '4'
      attr = o.attribute
      if attr == 'vehicle.moving' and not np.any(boxes.velocity[b]):
        attr = 'vehicle.stopped'
      if attr == 'pedestrian.moving' and not np.any(boxes.velocity[b]):
        attr = 'pedestrian.standing'
      rows['sample_annotation'].append(dict(
          token=ann_toks[j], sample_token=sample_toks[f], instance_token=inst_tok,
          visibility_token=vis, attribute_tokens=[token('attribute', attr)] if attr else [],
          translation=translation, size=size, rotation=rotation,
          prev=ann_toks[j - 1] if j else '', next=ann_toks[j + 1] if j + 1 < len(ann_toks) else '',
          num_lidar_pts=npts, num_radar_pts=0))
    rows['instance'].append(dict(token=inst_tok, category_token=token('category', rig.CLASSES[o.cls][0]),
                                 nbr_annotations=len(ann_toks), first_annotation_token=ann_toks[0],
                                 last_annotation_token=ann_toks[-1]))
