r"""nuScenes (real or synthetic) -> the TFDS dataset `nuscenes_nsmae`, through nuscenes-devkit.

  python -m data_prep.convert_nuscenes --dataroot=DIR --version=v1.0-trainval --out=DATA_DIR \
      [--splits=train,val] [--image_height=64 --image_width=176] [--num_sweeps=10] \
      [--bev_half_extent=32 --bev_resolution=0.5] [--workers=8] [--skip_missing]

Two stages, so that an interrupted conversion resumes instead of starting over:
1. Records: every key frame of the requested splits becomes one record file (devkit parsing,
   image resize + JPEG, multi-sweep points, map masks, boxes; stored by record_io: plain
   arrays, checksummed, never pickle), in `--workers` processes, under
   <out>/nuscenes_nsmae_records/<config>/. Each record is written to a temporary name and
   renamed, so a killed run leaves only complete records; a rerun checks them (checksum) and
   keeps the intact ones, redoing a damaged one.
2. Shards: the TFDS builder writes the records into TFRecord shards. TFDS writes into a
   temporary directory and renames it when all splits are done, so a dataset directory that
   exists is complete; the statistics (conversion_stats.json) are written into it before the
   rename. Then the records are deleted.

What is skipped and what stops (README "Data"): a split none of whose scenes the tables hold is
skipped with a warning (an error only when every requested split is empty); with
--skip_missing a key frame whose files are missing or unreadable (a partial download) is
skipped and listed in conversion_stats.json, without it that is an error naming the file and
sample; LiDAR returns with non-finite or absurd coordinates are dropped and counted; bad
calibration or an image of the wrong size is an error naming the sample and table/file.
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import collections
import glob
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from data_prep.nuscenes_nsmae import record as record_lib
from data_prep.nuscenes_nsmae import record_io
from data_prep.nuscenes_nsmae import record_workers
from data_prep.nuscenes_nsmae.record_workers import ConversionError
from nsmae_jax.data import naming, schema

STATS_FILE = 'conversion_stats.json'
# Official splits per table version: dataset split name -> nuscenes.utils.splits name.
_OFFICIAL = {'v1.0-trainval': {'train': 'train', 'val': 'val'},
             'v1.0-mini': {'train': 'mini_train', 'val': 'mini_val'},
             'v1.0-test': {'test': 'test'}}
def scene_splits(nusc, dataroot: str, version: str) -> dict[str, list[str]]:
  """{split: [scene names present]} from a custom splits.json if present, else the official
  splits of `version`.

  splits.json ({"train": [scene names], "val": [...]}, the devkit's custom-split layout) is
  looked for in <dataroot>/<version>/ (where the synthetic world writes it), then <dataroot>/.
  A custom split naming scenes the tables do not hold is an error (the file is wrong); an
  official split keeps the scenes that are present, and may come out empty (a dataroot with
  some scenes only, e.g. a one-scene v1.0-mini): `convert` skips empty splits.
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
  return {split: [s for s in scenes[name] if s in present]
          for split, name in _OFFICIAL[version].items()}


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


class _Stats:
  """Statistics of the converted key frames (frames, points, boxes, map coverage, what was
  dropped or skipped)."""

  def __init__(self, class_names: Sequence[str]):
    self.class_names = list(class_names)
    self.frames = collections.Counter()
    self.points: list[int] = []
    self.empty_key_frames: list[str] = []
    self.invalid_points: dict[str, int] = {}
    self.boxes = collections.Counter()
    self.map_fraction = np.zeros(len(schema.MAP_CLASSES))
    self.skipped: list[dict[str, str]] = []
    self.skipped_splits: dict[str, str] = {}

  def add(self, split: str, record: dict[str, Any]) -> None:
    points, bev = record['points'], record['bev_map']
    self.frames[split] += 1
    self.points.append(int(points.shape[0]))
    if not np.any(points[:, 4] == 0.0):
      self.empty_key_frames.append(record['token'])
    if record.get('invalid_points', 0):
      self.invalid_points[record['token']] = int(record['invalid_points'])
    self.boxes.update(self.class_names[i] for i in record['box_labels'].tolist())
    self.map_fraction += bev.reshape(bev.shape[0], -1).mean(1)

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
        'invalid_lidar_points': {
            'count': sum(self.invalid_points.values()), 'frames': len(self.invalid_points),
            'per_frame': dict(sorted(self.invalid_points.items())[:100]),
            'handling': f'dropped: non-finite, or |x|, |y| or |z| > '
                        f'{record_lib.MAX_ABS_COORD:g} m'},
        'skipped_key_frames': {'count': len(self.skipped), 'frames': self.skipped,
                               'handling': 'input file missing or unreadable (--skip_missing)'},
        'skipped_splits': self.skipped_splits,
        'boxes_per_class': {name: self.boxes.get(name, 0) for name in self.class_names},
        'map_class_coverage': {c: float(f / n)
                               for c, f in zip(schema.MAP_CLASSES, self.map_fraction)},
    }


def _remove_leftovers(records: str, out: str, log: Callable[[str], None]) -> None:
  """Deletes what a killed run leaves: record temporaries and TFDS `incomplete.*` directories
  (TFDS names them at random, so a rerun would never reuse or remove them). Two converters
  writing the same config at once are not supported."""
  stale = (glob.glob(os.path.join(records, '*', '*.npz.tmp*'))
           + glob.glob(os.path.join(os.path.dirname(out), f'incomplete.*_{naming.VERSION}')))
  for path in stale:
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
  if stale:
    log(f'removed {len(stale)} leftovers of an interrupted run (e.g. {stale[0]})')


def convert(data_config, workers: int = 1, splits: Sequence[str] | None = None,
            log: Callable[[str], None] | None = None, keep_records: bool = False,
            skip_missing: bool = False) -> str:
  """Converts data_config.dataroot/version into TFDS `nuscenes_nsmae` under data_config.data_dir.

  The builder config (naming.config_name) is set by image_height/width, num_sweeps,
  bev_half_extent and bev_resolution. `splits` defaults to every split of the dataroot's split
  definition (splits.json, else the official ones of the version); a split none of whose
  scenes are present is skipped with a warning, and if all are, that is a ValueError.
  skip_missing: skip (and list in the statistics) key frames whose input files are missing or
  unreadable instead of raising record.MissingInputError. Finished work is skipped: an existing
  dataset is returned at once; intact records of an interrupted run are reused.
  Returns the data dir. Raises ConversionError when the disk fills up (finished records kept).
  """
  log = log or logging.info
  data_dir = data_config.data_dir
  out = naming.dataset_dir(data_dir, data_config)
  if os.path.isfile(os.path.join(out, 'dataset_info.json')):
    _check_existing(out, splits)
    log(f'{out} already converted')
    return data_dir
  from nuscenes.nuscenes import NuScenes
  dataroot, version = data_config.dataroot, data_config.version
  if not os.path.isdir(os.path.join(dataroot, version)):
    raise FileNotFoundError(f'--dataroot/--version: {os.path.join(dataroot, version)} does not '
                            'exist')
  nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
  scene_split = scene_splits(nusc, dataroot, version)
  wanted = list(splits) if splits else list(scene_split)
  unknown = sorted(set(wanted) - set(scene_split))
  if unknown:
    raise ValueError(f'--splits: {unknown} not among the splits {sorted(scene_split)}')
  stats = _Stats(schema.DETECTION_CLASSES)
  for split in wanted:
    if not scene_split[split]:
      stats.skipped_splits[split] = f'none of its scenes are in {dataroot}/{version}'
      log(f'warning: skipping split {split!r}: {stats.skipped_splits[split]}')
  if len(stats.skipped_splits) == len(wanted):
    raise ValueError(f'{dataroot}/{version}: none of the scenes of the splits {wanted} are '
                     'present (a dataroot with other scenes needs a splits.json)')
  tokens = {split: sample_tokens(nusc, scene_split[split]) for split in wanted
            if split not in stats.skipped_splits}
  records = naming.record_dir(data_dir, data_config)
  _remove_leftovers(records, out, log)
  for split in tokens:
    os.makedirs(os.path.join(records, split), exist_ok=True)
  jobs = [(split, t) for split, split_tokens in tokens.items() for t in split_tokens]
  found = sum(os.path.isfile(naming.record_path(records, *job)) for job in jobs)
  log(f'{dataroot}/{version} -> {out}: {len(jobs)} key frames '
      f'({", ".join(f"{s} {len(t)}" for s, t in tokens.items())}), {found} records of an '
      'earlier run found (checked before reuse)')
  locations = {nusc.get('log', scene['log_token'])['location'] for scene in nusc.scene}
  maps = record_workers.load_maps(dataroot, locations)
  settings = record_lib.RecordSettings(
      image_height=data_config.image_height, image_width=data_config.image_width,
      num_sweeps=data_config.num_sweeps, bev_half_extent=float(data_config.bev_half_extent),
      bev_resolution=float(data_config.bev_resolution))
  state = dict(nusc=nusc, maps=maps, settings=settings, records=records,
               skip_missing=skip_missing, dataroot=dataroot, version=version,
               locations=sorted(locations))
  outcomes = record_workers.make_records(state, jobs, workers, log)
  del nusc, maps, state
  for split in list(tokens):
    for token in tokens[split]:
      outcome, missing = outcomes[token]
      if outcome == 'skipped':
        stats.skipped.append({'split': split, 'token': token, 'missing': missing})
    tokens[split] = [t for t in tokens[split] if outcomes[t][0] != 'skipped']
    if not tokens[split]:
      del tokens[split]
      stats.skipped_splits[split] = 'every key frame was skipped (missing input)'
  if stats.skipped:
    log(f'warning: skipped {len(stats.skipped)} key frames with missing input (listed in '
        f'{STATS_FILE}), e.g. {stats.skipped[0]}')
  if not tokens:
    raise ConversionError(f'{dataroot}/{version}: every key frame of {wanted} was skipped '
                          f'(missing input, e.g. {stats.skipped[0]["missing"]})')
  summary = _write_shards(data_config, records, tokens, stats, log)
  log('statistics: ' + json.dumps(summary))
  if not keep_records:
    shutil.rmtree(records, ignore_errors=True)
    try:  # the parent holds other configs' records, if any
      os.rmdir(os.path.dirname(records))
    except OSError:
      pass
  return data_dir


def _is_no_space(e: BaseException | None) -> bool:
  """Whether an error, or one it was raised from, says the disk (or file size limit) is full:
  an OSError, or TensorFlow's ResourceExhaustedError that TFDS re-raises as RuntimeError."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in record_workers.NO_SPACE:
      return True
    if any(os.strerror(n) in str(e) for n in record_workers.NO_SPACE):
      return True
    e = e.__cause__ or e.__context__
  return False


def _write_shards(data_config, records: str, tokens: dict[str, list[str]], stats: _Stats,
                  log: Callable[[str], None]) -> dict[str, Any]:
  """Stage 2: TFRecord shards from the records, and STATS_FILE beside them, all in TFDS'
  temporary directory that one rename makes the dataset. Returns the statistics."""
  import tensorflow_datasets as tfds
  from data_prep.nuscenes_nsmae import nuscenes_nsmae_dataset_builder as builder_lib
  summary = {}

  def write_stats(directory: str) -> None:
    summary.update(stats.summary())
    with open(os.path.join(directory, STATS_FILE), 'w') as f:
      json.dump(summary, f, indent=1)

  builder = builder_lib.Builder(config=builder_lib.builder_config(data_config),
                                data_dir=data_config.data_dir, record_dir=records,
                                splits=tokens, on_example=stats.add, on_prepared=write_stats)
  start = time.time()
  try:
    builder.download_and_prepare(
        download_dir=os.path.join(records, 'downloads'),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except; TFDS wraps TF's errors in RuntimeError
    if _is_no_space(e):
      out = os.path.dirname(naming.dataset_dir(data_config.data_dir, data_config))
      raise record_workers.no_space_error(e, out, 'shards') from None
    raise
  total = sum(len(t) for t in tokens.values())
  log(f'shards: {total} examples in {time.time() - start:.1f} s')
  return summary


def _check_existing(out: str, splits: Sequence[str] | None) -> None:
  """An existing dataset must hold the requested splits (TFDS cannot add one later), unless
  the conversion skipped them (no scene, or no key frame with its files)."""
  if not splits:
    return
  with open(os.path.join(out, 'dataset_info.json')) as f:
    have = {s['name'] for s in json.load(f).get('splits', [])}
  stats_path = os.path.join(out, STATS_FILE)
  if os.path.isfile(stats_path):
    with open(stats_path) as f:
      have |= set(json.load(f).get('skipped_splits', {}))
  missing = sorted(set(splits) - have)
  if missing:
    raise ValueError(f'--splits: {out} exists without {missing}; delete it to rebuild with '
                     'those splits')


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from nsmae_jax.config import DataConfig
  f = flags.FLAGS
  if len(argv) > 1:
    _exit(f'unexpected positional arguments {list(argv[1:])}', 2)
  bev = 2 * f.bev_half_extent / f.bev_resolution if f.bev_resolution > 0 else 0.5
  if abs(bev - round(bev)) > 1e-6:
    _exit('--bev_resolution: 2 * bev_half_extent is not a multiple of it', 2)
  for name in ('image_height', 'image_width', 'num_sweeps', 'workers'):
    if f[name].value < 1:
      _exit(f'--{name}: must be >= 1, got {f[name].value}', 2)
  data_config = DataConfig(
      data_dir=f.out, dataroot=f.dataroot, version=f.version, image_height=f.image_height,
      image_width=f.image_width, num_sweeps=f.num_sweeps, bev_half_extent=f.bev_half_extent,
      bev_resolution=f.bev_resolution)
  logging.getLogger().setLevel(logging.INFO)
  try:
    convert(data_config, workers=f.workers, splits=f.splits or None, log=print,
            keep_records=f.keep_records, skip_missing=f.skip_missing)
  except (ConversionError, record_lib.MissingInputError, record_lib.BadInputError,
          record_io.CorruptRecordError) as e:
    # Bad data or a full disk: the message says which file and what to do; no traceback.
    _exit(str(e), 1)


def _exit(message: str, status: int) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _define_flags() -> None:
  from absl import flags
  defaults = {'image_height': 64, 'image_width': 176, 'num_sweeps': 1, 'bev_half_extent': 32.0,
              'bev_resolution': 0.5}
  flags.DEFINE_string('dataroot', None, 'nuScenes-format dataroot (real or synthetic).',
                      required=True)
  flags.DEFINE_string('version', 'v1.0-trainval', 'Table version under --dataroot.')
  flags.DEFINE_string('out', None, 'TFDS data dir to write nuscenes_nsmae into.', required=True)
  flags.DEFINE_list('splits', [], 'Splits to convert (default: all of splits.json / the '
                    'official ones, e.g. train,val); a split with no scene present is skipped.')
  flags.DEFINE_integer('image_height', defaults['image_height'], 'Stored image height (px).')
  flags.DEFINE_integer('image_width', defaults['image_width'], 'Stored image width (px).')
  flags.DEFINE_integer('num_sweeps', defaults['num_sweeps'],
                       'LiDAR sweeps per key frame, the key frame included (nuScenes: 10).')
  flags.DEFINE_float('bev_half_extent', defaults['bev_half_extent'],
                     'BEV map half extent (m) around the LiDAR.')
  flags.DEFINE_float('bev_resolution', defaults['bev_resolution'], 'BEV map cell size (m).')
  flags.DEFINE_integer('workers', max(1, (os.cpu_count() or 1)), 'Record worker processes.')
  flags.DEFINE_bool('keep_records', False, 'Keep the per-key-frame records after the build.')
  flags.DEFINE_bool('skip_missing', False,
                    'Skip key frames whose image, .pcd.bin or sweep file is missing or '
                    'unreadable (a partial download) and list them in conversion_stats.json, '
                    'instead of stopping with an error naming the file.')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
