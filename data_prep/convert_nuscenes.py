r"""nuScenes (real or synthetic) -> the TFDS dataset `nuscenes_nsmae`, through nuscenes-devkit.

  python -m data_prep.convert_nuscenes --dataroot=DIR --version=v1.0-trainval --out=DATA_DIR \
      [--splits=train,val] [--image_height=64 --image_width=176] [--num_sweeps=10] \
      [--bev_half_extent=32 --bev_resolution=0.5] [--workers=8]

Two stages, so that an interrupted conversion resumes instead of starting over:
1. Records: every key frame of the requested splits becomes one pickled record (devkit parsing,
   image resize + JPEG, multi-sweep points, map masks, boxes), in `--workers` processes, under
   <out>/nuscenes_nsmae_records/<config>/. Each record is written to a temporary name and
   renamed, so a killed run leaves only complete records; a rerun skips them.
2. Shards: the TFDS builder writes the records into TFRecord shards. TFDS writes into a
   temporary directory and renames it when all splits are done, so a dataset directory that
   exists is complete. Then the statistics are written next to it (conversion_stats.json) and
   the records are deleted.
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import collections
import functools
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from data_prep.nuscenes_nsmae import record as record_lib
from nsmae_jax.data import naming, schema

STATS_FILE = 'conversion_stats.json'
# Official splits per table version: dataset split name -> nuscenes.utils.splits name.
_OFFICIAL = {'v1.0-trainval': {'train': 'train', 'val': 'val'},
             'v1.0-mini': {'train': 'mini_train', 'val': 'mini_val'},
             'v1.0-test': {'test': 'test'}}


def scene_splits(nusc, dataroot: str, version: str) -> dict[str, list[str]]:
  """{split: [scene names]} from a custom splits.json if present, else the official splits.

  splits.json ({"train": [scene names], "val": [...]}, the devkit's custom-split layout) is
  looked for in <dataroot>/<version>/ (where the synthetic world writes it), then <dataroot>/.
  Scenes of a split that the dataroot does not hold are an error for a custom split and are
  left out of an official one only when none of them are there (e.g. `test` on trainval).
  """
  present = {scene['name'] for scene in nusc.scene}
  candidates = [os.path.join(dataroot, version, 'splits.json'),
                os.path.join(dataroot, 'splits.json')]
  path = next((p for p in candidates if os.path.isfile(p)), candidates[0])
  if os.path.isfile(path):
    with open(path) as f:
      splits = json.load(f)
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
      raise ValueError(f'{path}: expected {{"split": [scene names]}}')
    for split, scenes in splits.items():
      missing = sorted(set(scenes) - present)
      if missing:
        raise ValueError(f'{path}: split {split!r} names scenes not in {version}: {missing[:5]}')
    return {split: list(scenes) for split, scenes in splits.items()}
  if version not in _OFFICIAL:
    raise ValueError(f'--version={version}: no official split for it and no {path}')
  from nuscenes.utils import splits as official
  scenes = official.create_splits_scenes()
  result = {}
  for split, name in _OFFICIAL[version].items():
    result[split] = [s for s in scenes[name] if s in present]
    if not result[split]:
      raise ValueError(f'{dataroot}/{version}: none of the scenes of the official {name!r} '
                       'split are present (a custom dataroot needs a splits.json)')
  return result


def sample_tokens(nusc, scene_names: Sequence[str]) -> list[str]:
  """Key-frame sample tokens of the scenes, in scene order then time order."""
  by_name = {scene['name']: scene for scene in nusc.scene}
  tokens = []
  for name in scene_names:
    token = by_name[name]['first_sample_token']
    while token:
      tokens.append(token)
      token = nusc.get('sample', token)['next']
  return tokens


# Per-process state of the record workers (filled before fork, inherited copy-on-write).
_WORKER: dict[str, Any] = {}


def _record_stats(record: dict[str, Any]) -> dict[str, Any]:
  points = record['points']
  return {'points': int(points.shape[0]),
          'key_points': int(np.count_nonzero(points[:, 4] == 0.0)),
          'labels': record['box_labels'].tolist(),
          'map_cells': record['bev_map'].reshape(record['bev_map'].shape[0], -1).sum(1).tolist(),
          'map_total': int(np.prod(record['bev_map'].shape[1:]))}


def _write_record(job: tuple[str, int, str]) -> tuple[str, str]:
  """Makes and atomically writes one record; returns (split, token)."""
  split, index, token = job
  nusc, settings, records = _WORKER['nusc'], _WORKER['settings'], _WORKER['records']
  sample = nusc.get('sample', token)
  location = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
  rec = record_lib.make_record(nusc, _WORKER['maps'][location], token, settings)
  path = naming.record_path(records, split, index, token)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    pickle.dump(rec, f, protocol=pickle.HIGHEST_PROTOCOL)
  os.replace(tmp, path)
  return split, token


def _init_worker() -> None:
  import cv2
  cv2.setNumThreads(1)  # one process per core already


class _Stats:
  """Running statistics of the written records (frames, points, boxes, map coverage)."""

  def __init__(self, class_names: Sequence[str]):
    self.class_names = list(class_names)
    self.frames = collections.Counter()
    self.points: list[int] = []
    self.empty_key_frames: list[str] = []
    self.boxes = collections.Counter()
    self.map_fraction = np.zeros(len(schema.MAP_CLASSES))

  def add(self, split: str, record: dict[str, Any]) -> None:
    s = _record_stats(record)
    self.frames[split] += 1
    self.points.append(s['points'])
    if s['key_points'] == 0:
      self.empty_key_frames.append(record['token'])
    self.boxes.update(self.class_names[i] for i in s['labels'])
    self.map_fraction += np.asarray(s['map_cells']) / s['map_total']

  def summary(self) -> dict[str, Any]:
    n = max(sum(self.frames.values()), 1)
    pts = np.asarray(self.points or [0])
    return {
        'frames': dict(self.frames),
        'points_per_frame': {'mean': float(pts.mean()), 'min': int(pts.min()),
                             'max': int(pts.max())},
        'key_frames_without_lidar_points': {'count': len(self.empty_key_frames),
                                            'tokens': self.empty_key_frames[:20],
                                            'handling': 'kept; their points hold sweeps only '
                                                        '(or none: all-False points_mask)'},
        'boxes_per_class': {name: self.boxes.get(name, 0) for name in self.class_names},
        'map_class_coverage': {c: float(f / n)
                               for c, f in zip(schema.MAP_CLASSES, self.map_fraction)},
    }


def _make_records(nusc, maps, settings, records: str, jobs: list[tuple[str, int, str]],
                  total: int, workers: int, log: Callable[[str], None]) -> None:
  """Stage 1: writes the missing records, in `workers` processes, with a progress bar."""
  from tqdm import tqdm
  _WORKER.update(nusc=nusc, maps=maps, settings=settings, records=records)
  bar = tqdm(total=total, initial=total - len(jobs), unit='frame', desc='records',
             smoothing=0.1, dynamic_ncols=True)
  start = time.time()
  try:
    if workers <= 1:
      for job in jobs:
        _write_record(job)
        bar.update(1)
    elif jobs:
      # fork: workers inherit the loaded tables and maps instead of re-reading them.
      with multiprocessing.get_context('fork').Pool(workers, initializer=_init_worker) as pool:
        for _ in pool.imap_unordered(_write_record, jobs, chunksize=1):
          bar.update(1)
  finally:
    bar.close()
    _WORKER.clear()
  if jobs:
    elapsed = time.time() - start
    log(f'records: {len(jobs)} key frames in {elapsed:.1f} s '
        f'({len(jobs) / max(elapsed, 1e-9):.2f} frames/s, {workers} workers)')


def _memoize_polygons(nusc_map):
  """get_map_mask rebuilds every polygon of a layer from its nodes on each call (~40% of its
  time); a polygon depends only on its token, so cache them per process."""
  nusc_map.extract_polygon = functools.lru_cache(maxsize=None)(nusc_map.extract_polygon)
  return nusc_map


def convert(data_config, workers: int = 1, splits: Sequence[str] | None = None,
            log: Callable[[str], None] | None = None, keep_records: bool = False) -> str:
  """Converts data_config.dataroot/version into TFDS `nuscenes_nsmae` under data_config.data_dir.

  The builder config (naming.config_name) is set by image_height/width, num_sweeps,
  bev_half_extent and bev_resolution. `splits` defaults to every split of the dataroot's split
  definition (splits.json, else the official ones of the version). Finished work is skipped:
  an existing dataset is returned at once; finished records of an interrupted run are reused.
  Returns the data dir.
  """
  log = log or logging.info
  data_dir = data_config.data_dir
  out = naming.dataset_dir(data_dir, data_config)
  if os.path.isfile(os.path.join(out, 'dataset_info.json')):
    _check_existing(out, splits)
    log(f'{out} already converted')
    return data_dir
  from nuscenes.map_expansion.map_api import NuScenesMap
  from nuscenes.nuscenes import NuScenes
  version_dir = os.path.join(data_config.dataroot, data_config.version)
  if not os.path.isdir(version_dir):
    raise FileNotFoundError(f'--dataroot/--version: {version_dir} does not exist')
  nusc = NuScenes(version=data_config.version, dataroot=data_config.dataroot, verbose=False)
  scene_split = scene_splits(nusc, data_config.dataroot, data_config.version)
  wanted = list(splits) if splits else list(scene_split)
  unknown = sorted(set(wanted) - set(scene_split))
  if unknown:
    raise ValueError(f'--splits: {unknown} not among the splits {sorted(scene_split)}')
  tokens = {split: sample_tokens(nusc, scene_split[split]) for split in wanted}
  records = naming.record_dir(data_dir, data_config)
  jobs = []
  for split, split_tokens in tokens.items():
    os.makedirs(os.path.join(records, split), exist_ok=True)
    jobs += [(split, i, t) for i, t in enumerate(split_tokens)
             if not os.path.isfile(naming.record_path(records, split, i, t))]
  total = sum(len(t) for t in tokens.values())
  log(f'{data_config.dataroot}/{data_config.version} -> {out}: {total} key frames '
      f'({", ".join(f"{s} {len(t)}" for s, t in tokens.items())}), '
      f'{total - len(jobs)} already done')
  locations = {nusc.get('log', scene['log_token'])['location'] for scene in nusc.scene}
  maps = {loc: _memoize_polygons(NuScenesMap(dataroot=data_config.dataroot, map_name=loc))
          for loc in locations}
  settings = record_lib.RecordSettings(
      image_height=data_config.image_height, image_width=data_config.image_width,
      num_sweeps=data_config.num_sweeps, bev_half_extent=float(data_config.bev_half_extent),
      bev_resolution=float(data_config.bev_resolution))
  _make_records(nusc, maps, settings, records, jobs, total, workers, log)
  del nusc, maps
  stats = _write_shards(data_config, records, tokens, log)
  with open(os.path.join(out, STATS_FILE), 'w') as f:
    json.dump(stats, f, indent=1)
  log('statistics: ' + json.dumps(stats))
  if not keep_records:
    shutil.rmtree(records, ignore_errors=True)
    try:  # the parent holds other configs' records, if any
      os.rmdir(os.path.dirname(records))
    except OSError:
      pass
  return data_dir


def _write_shards(data_config, records: str, tokens: dict[str, list[str]],
                  log: Callable[[str], None]) -> dict[str, Any]:
  """Stage 2: TFRecord shards from the records (TFDS' atomic directory rename)."""
  import tensorflow_datasets as tfds
  from data_prep.nuscenes_nsmae import nuscenes_nsmae_dataset_builder as builder_lib
  stats = _Stats(schema.DETECTION_CLASSES)
  builder = builder_lib.Builder(config=builder_lib.builder_config(data_config),
                                data_dir=data_config.data_dir, record_dir=records,
                                splits=tokens, on_example=stats.add)
  start = time.time()
  builder.download_and_prepare(
      download_dir=os.path.join(records, 'downloads'),
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  total = sum(len(t) for t in tokens.values())
  log(f'shards: {total} examples in {time.time() - start:.1f} s')
  return stats.summary()


def _check_existing(out: str, splits: Sequence[str] | None) -> None:
  """An existing dataset must hold the requested splits (TFDS cannot add one later)."""
  if not splits:
    return
  with open(os.path.join(out, 'dataset_info.json')) as f:
    have = {s['name'] for s in json.load(f).get('splits', [])}
  missing = sorted(set(splits) - have)
  if missing:
    raise ValueError(f'--splits: {out} exists without {missing}; delete it to rebuild with '
                     'those splits')


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from nsmae_jax.config import DataConfig
  del argv
  f = flags.FLAGS
  data_config = DataConfig(
      data_dir=f.out, dataroot=f.dataroot, version=f.version, image_height=f.image_height,
      image_width=f.image_width, num_sweeps=f.num_sweeps, bev_half_extent=f.bev_half_extent,
      bev_resolution=f.bev_resolution)
  bev = 2 * f.bev_half_extent / f.bev_resolution
  if abs(bev - round(bev)) > 1e-6:
    raise flags.ValidationError('--bev_resolution: 2 * bev_half_extent is not a multiple of it')
  logging.getLogger().setLevel(logging.INFO)
  convert(data_config, workers=f.workers, splits=f.splits or None, log=print,
          keep_records=f.keep_records)


def _define_flags() -> None:
  from absl import flags
  defaults = {'image_height': 64, 'image_width': 176, 'num_sweeps': 1, 'bev_half_extent': 32.0,
              'bev_resolution': 0.5}
  flags.DEFINE_string('dataroot', None, 'nuScenes-format dataroot (real or synthetic).',
                      required=True)
  flags.DEFINE_string('version', 'v1.0-trainval', 'Table version under --dataroot.')
  flags.DEFINE_string('out', None, 'TFDS data dir to write nuscenes_nsmae into.', required=True)
  flags.DEFINE_list('splits', [], 'Splits to convert (default: all of splits.json / the '
                    'official ones, e.g. train,val).')
  flags.DEFINE_integer('image_height', defaults['image_height'], 'Stored image height (px).')
  flags.DEFINE_integer('image_width', defaults['image_width'], 'Stored image width (px).')
  flags.DEFINE_integer('num_sweeps', defaults['num_sweeps'],
                       'LiDAR sweeps per key frame, the key frame included (nuScenes: 10).')
  flags.DEFINE_float('bev_half_extent', defaults['bev_half_extent'],
                     'BEV map half extent (m) around the LiDAR.')
  flags.DEFINE_float('bev_resolution', defaults['bev_resolution'], 'BEV map cell size (m).')
  flags.DEFINE_integer('workers', max(1, (os.cpu_count() or 1)), 'Record worker processes.')
  flags.DEFINE_bool('keep_records', False, 'Keep the per-key-frame records after the build.')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
