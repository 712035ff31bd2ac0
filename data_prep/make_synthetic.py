r"""Writes a synthetic driving world as a nuScenes dataroot.

  python -m data_prep.make_synthetic --out=/tmp/nuscenes_synth --num_scenes=10 --seed=0

The result loads with the official nuscenes-devkit (NuScenes(version, dataroot)); the train/val
split is `<out>/<version>/splits.json` (devkit custom splits, named 'train' and 'val'). Scenes
carry official v1.0-trainval names of their split (train: scene-0001, scene-0002, ...; val:
scene-0003, scene-0012, ...), so the devkit's DetectionEval, which selects ground truth by the
official split names, scores the world; splits.json lists the same names.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time

from absl import app, flags

from data_prep.synthetic import mapexp, rig, tables
from data_prep.synthetic.simulate import (Settings, StageTimer, cached_town, location_index, log_token,
                                          scene_names, simulate_scene)
from data_prep.synthetic.world_io import WORLD_FILE, write_world_file

_TABLE_ORDER = ('attribute', 'calibrated_sensor', 'category', 'ego_pose', 'instance', 'log', 'map',
                'sample', 'sample_annotation', 'sample_data', 'scene', 'sensor', 'visibility')


class SettingError(ValueError):
  """A bad argument of generate(); `flag` names the command-line flag it comes from."""

  def __init__(self, flag: str, value, why: str):
    super().__init__(f'make_synthetic: invalid {flag}={value!r}: {why}')
    self.flag, self.value, self.why = flag, value, why

  def __reduce__(self):
    return type(self), (self.flag, self.value, self.why)

  def flag_message(self) -> str:
    """`--flag: problem`, the one-line form of the command-line tools."""
    return f'--{self.flag}: invalid value {self.value!r}: {self.why}'


def _check(cond: bool, flag: str, value, why: str) -> None:
  if not cond:
    raise SettingError(flag, value, why)


def _scene_job(args):
  """(table rows, CPU seconds per stage) of one scene; runs in a worker."""
  out, settings, index, name = args
  timer = StageTimer()
  start = time.process_time()
  rows = simulate_scene(out, settings, index, name, timer)
  timer.seconds['other'] = time.process_time() - start - sum(timer.seconds.values())
  return rows, timer.seconds


def generate(out: str, *, num_scenes: int = 10, val_scenes: int = 2, frames_per_scene: int = 40,
             sweeps_per_frame: int = 9, image_width: int = 800, image_height: int = 450,
             seed: int = 0, workers: int = 1, overwrite: bool = False,
             version: str = 'v1.0-trainval', log=None) -> str:
  """Writes the world to `out` (a nuScenes dataroot: <out>/<version>/*.json tables, samples/,
  sweeps/, maps/, maps/expansion/*.json, <out>/<version>/splits.json) and returns `out`.

  The last `val_scenes` scenes form the 'val' split. Output bytes depend only on the arguments
  other than `workers` and `log` (a callable taking a message string). The world is written
  into `<out>.incomplete` and renamed to `out` when complete, so an interrupted run leaves no
  half-written dataroot; the next run starts that directory afresh.
  """
  _check(isinstance(num_scenes, int) and num_scenes >= 1, 'num_scenes', num_scenes, 'need >= 1')
  _check(isinstance(val_scenes, int) and 0 <= val_scenes < num_scenes, 'val_scenes', val_scenes,
         f'need 0 <= val_scenes < num_scenes ({num_scenes})')
  _check(isinstance(frames_per_scene, int) and frames_per_scene >= 1, 'frames_per_scene',
         frames_per_scene, 'need >= 1')
  _check(isinstance(sweeps_per_frame, int) and 0 <= sweeps_per_frame <= 49, 'sweeps_per_frame',
         sweeps_per_frame, 'need 0..49')
  _check(isinstance(image_width, int) and 16 <= image_width <= 4000, 'image_width', image_width,
         'need 16..4000')
  _check(isinstance(image_height, int) and 16 <= image_height <= 4000, 'image_height', image_height,
         'need 16..4000')
  _check(isinstance(seed, int) and seed >= 0, 'seed', seed, 'need an integer >= 0')
  _check(isinstance(workers, int) and workers >= 1, 'workers', workers, 'need >= 1')
  _check(isinstance(version, str) and version.startswith('v1.0-') and '/' not in version, 'version',
         version, "need 'v1.0-<name>'")
  _check(num_scenes - val_scenes <= 700 and val_scenes <= 150, 'num_scenes', num_scenes,
         'scenes take official v1.0-trainval names: at most 700 train and 150 val scenes')
  _check(bool(out), 'out', out, 'need a directory')
  log = log or (lambda msg: None)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    if not overwrite:
      raise FileExistsError(f'make_synthetic: --out={out} exists and is not empty; pass --overwrite '
                            'to replace it')
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, WORLD_FILE)):
      raise FileExistsError(f'make_synthetic: refusing to overwrite {out}: it was not written by '
                            f'make_synthetic (no {WORLD_FILE})')
    shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
  final, out = out, os.path.normpath(out) + '.incomplete'
  if os.path.exists(out):  # left by an interrupted run; the world is deterministic: redo it
    log(f'removing {out} left by an interrupted run')
    shutil.rmtree(out)
  os.makedirs(out)

  settings = Settings(seed, num_scenes, val_scenes, frames_per_scene, sweeps_per_frame,
                      image_width, image_height)
  start = time.time()
  names = scene_names(num_scenes, val_scenes)
  jobs = [(out, settings, i, names[i]) for i in range(num_scenes)]
  pool = None
  if workers > 1 and num_scenes > 1:
    pool = multiprocessing.get_context('spawn').Pool(min(workers, num_scenes))
  try:
    # Workers start on the scenes at once; the main process writes the maps meanwhile.
    results = pool.imap(_scene_job, jobs, chunksize=1) if pool else map(_scene_job, jobs)
    map_rows = _write_maps(out, seed, num_scenes)
    all_rows = {name: [] for name in _TABLE_ORDER}
    stages = {}
    for i, (rows, seconds) in enumerate(results):
      for name, r in rows.items():
        all_rows[name].extend(r)
      for stage, sec in seconds.items():
        stages[stage] = stages.get(stage, 0.0) + sec
      log(f'scene {i + 1}/{num_scenes} done ({time.time() - start:.1f}s)')
  except BaseException:
    if pool:
      pool.terminate()  # do not wait for the other scenes on an error or Ctrl-C
    raise
  finally:
    if pool:
      pool.close()
      pool.join()
  scenes_done = time.time()
  all_rows['map'] = map_rows
  all_rows['sensor'] = tables.sensor_rows()
  all_rows['category'] = tables.category_rows()
  all_rows['attribute'] = tables.attribute_rows()
  all_rows['visibility'] = tables.visibility_rows()

  root = os.path.join(out, version)
  tables.write_tables(root, all_rows)
  split = num_scenes - val_scenes
  tables.write_table(os.path.join(root, 'splits.json'), dict(train=names[:split], val=names[split:]))
  write_world_file(out, settings, names)
  if os.path.isdir(final):
    os.rmdir(final)  # empty (checked above)
  os.replace(out, final)
  out = final
  elapsed = time.time() - start
  key_frames = num_scenes * frames_per_scene
  log(f'wrote {key_frames} key frames to {out} in {elapsed:.1f}s ({key_frames / elapsed:.2f} key '
      f'frames/s, {workers} workers)')
  log('timing: scene CPU s summed over workers: ' + ', '.join(
      f'{k} {v:.1f}' for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
      + f'; tables {time.time() - scenes_done:.1f}s wall')
  return out


def _write_maps(out: str, seed: int, num_scenes: int) -> list:
  """Writes maps/ (one town per location in use; every location gets an expansion file) and
  returns the map table rows."""
  os.makedirs(os.path.join(out, 'maps', 'expansion'), exist_ok=True)
  rows = []
  for loc, location in enumerate(rig.LOCATIONS):
    path = os.path.join(out, 'maps', 'expansion', f'{location}.json')
    scenes = [i for i in range(num_scenes) if location_index(seed, i) == loc]
    if not scenes:
      mapexp.write_map_json(path, mapexp.empty_map(location))
      continue
    town = cached_town(seed, loc)
    mapexp.write_map_json(path, mapexp.town_map(town, seed))
    map_tok = tables.token(seed, 'map', location)
    png = f'maps/{map_tok}.png'
    mapexp.write_map_png(os.path.join(out, png), town)
    rows.append(dict(token=map_tok, log_tokens=[log_token(seed, i) for i in scenes],
                     category='semantic_prior', filename=png))
  return rows


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """CLI flags, defined only when run as a program: importing `generate` (the pipeline does)
  must not claim global flag names such as --image_width."""
  flags.DEFINE_string('out', None, 'Output nuScenes dataroot (must be empty or absent).')
  flags.DEFINE_integer('num_scenes', 10, 'Number of scenes (20 s each at the default frames).')
  flags.DEFINE_integer('val_scenes', 2, "Scenes (the last ones) in the 'val' split.")
  flags.DEFINE_integer('frames_per_scene', 40, 'Key frames per scene (2 Hz).')
  flags.DEFINE_integer('sweeps_per_frame', 9, 'Non-key LiDAR sweeps between key frames (nuScenes: 9).')
  flags.DEFINE_integer('image_width', 800, 'Camera image width in pixels.')
  flags.DEFINE_integer('image_height', 450, 'Camera image height in pixels.')
  flags.DEFINE_integer('seed', 0, 'World seed: same seed, byte-identical output.')
  flags.DEFINE_integer('workers', 1, 'Worker processes (one scene each at a time).')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty --out written by this tool.')
  flags.DEFINE_string('version', 'v1.0-trainval', 'nuScenes version directory name.')


def _usage_error(message: str) -> None:
  """Exits like the other entry points on a bad flag: one line, status 2, no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _usage_error(f'unexpected positional arguments {list(argv[1:])}')
  if not FLAGS.out:
    _usage_error('--out: required (the dataroot to write)')
  try:
    generate(FLAGS.out, num_scenes=FLAGS.num_scenes, val_scenes=FLAGS.val_scenes,
             frames_per_scene=FLAGS.frames_per_scene, sweeps_per_frame=FLAGS.sweeps_per_frame,
             image_width=FLAGS.image_width, image_height=FLAGS.image_height, seed=FLAGS.seed,
             workers=FLAGS.workers, overwrite=FLAGS.overwrite, version=FLAGS.version, log=print)
  except SettingError as e:
    _usage_error(e.flag_message())
  except FileExistsError as e:  # a non-empty --out: says to pass --overwrite, or why not
    _usage_error(str(e))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
