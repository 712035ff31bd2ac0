"""Bad input and interruption: errors name the file and sample; bad points are dropped and
counted; --skip_missing skips partial key frames; a rerun resumes and redoes damaged records."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from helpers import WORLD, tiny_config
from nsmae_jax.data import naming
from data_prep.nuscenes_nsmae import record as record_lib
from data_prep.nuscenes_nsmae import record_io


@pytest.fixture
def world(synthetic_dataroot, tmp_path):
  """A private copy of the tiny world that a test may damage."""
  out = str(tmp_path / 'nuscenes')
  shutil.copytree(synthetic_dataroot, out)
  return out


def _nusc(dataroot):
  from nuscenes.nuscenes import NuScenes
  return NuScenes(version='v1.0-trainval', dataroot=dataroot, verbose=False)


def _settings(num_sweeps=2):
  return record_lib.RecordSettings(image_height=32, image_width=88, num_sweeps=num_sweeps,
                                   bev_half_extent=8.0, bev_resolution=0.5)


def _map(nusc, dataroot):
  from nuscenes.map_expansion.map_api import NuScenesMap
  return NuScenesMap(dataroot=dataroot, map_name=nusc.log[0]['location'])


def _file_of(nusc, token):
  return os.path.join(nusc.dataroot, nusc.get('sample_data', token)['filename'])


@pytest.mark.parametrize('what', ['CAM_BACK_LEFT', 'LIDAR_TOP', 'sweep'])
def test_missing_file_names_file_and_sample(world, what):
  nusc = _nusc(world)
  sample = nusc.sample[5]
  if what == 'sweep':
    token = nusc.get('sample_data', sample['data']['LIDAR_TOP'])['prev']
  else:
    token = sample['data'][what]
  path = _file_of(nusc, token)
  os.remove(path)
  with pytest.raises(record_lib.MissingInputError) as info:
    record_lib.make_record(nusc, _map(nusc, world), sample['token'], _settings())
  assert os.path.basename(path) in str(info.value)
  assert sample['token'] in str(info.value)
  assert info.value.path == path  # what --skip_missing lists


def test_empty_key_frame_is_kept_with_sweeps_only(world):
  """Documented handling: a key frame whose .pcd.bin holds no points is kept; its points are
  the sweeps' (none with --num_sweeps=1, i.e. an all-False points_mask in the pipeline)."""
  nusc = _nusc(world)
  sample = nusc.sample[5]
  open(_file_of(nusc, sample['data']['LIDAR_TOP']), 'wb').close()
  nusc_map = _map(nusc, world)
  rec = record_lib.make_record(nusc, nusc_map, sample['token'], _settings(num_sweeps=2))
  assert len(rec['points']) > 0 and np.all(rec['points'][:, 4] > 0)
  rec = record_lib.make_record(nusc, nusc_map, sample['token'], _settings(num_sweeps=1))
  assert rec['points'].shape == (0, 5)


def _val_samples(nusc, world):
  """Key frames of the world's val scene, in time order."""
  val_scene = json.load(open(os.path.join(world, 'v1.0-trainval', 'splits.json')))['val'][0]
  scene = next(s for s in nusc.scene if s['name'] == val_scene)
  samples, token = [], scene['first_sample_token']
  while token:
    samples.append(nusc.get('sample', token))
    token = samples[-1]['next']
  return samples


def test_interrupted_conversion_resumes(world, tmp_path):
  """A conversion that dies midway leaves no dataset that looks complete; the rerun reuses the
  finished records (same files, untouched), makes a damaged one again, and finishes, counting
  an empty key frame."""
  from data_prep.convert_nuscenes import STATS_FILE, convert
  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=world,
                       bev_half_extent=8.0).data
  nusc = _nusc(world)
  first, second, third, _ = _val_samples(nusc, world)
  image = _file_of(nusc, third['data']['CAM_FRONT'])
  shutil.move(image, image + '.away')
  open(_file_of(nusc, first['data']['LIDAR_TOP']), 'wb').close()  # an empty key frame

  with pytest.raises(record_lib.MissingInputError, match=third['token']):
    convert(config, workers=1, splits=['val'], keep_records=True)
  out = naming.dataset_dir(config.data_dir, config)
  assert not os.path.exists(os.path.join(out, 'dataset_info.json'))
  records = os.path.join(naming.record_dir(config.data_dir, config), 'val')
  done = sorted(os.listdir(records))
  assert done == sorted(f'{s["token"]}.npz' for s in (first, second))
  mtimes = {f: os.stat(os.path.join(records, f)).st_mtime_ns for f in done}
  # A record damaged between the runs (bit rot, a hand copy) is found and made again.
  damaged = naming.record_path(os.path.dirname(records), 'val', second['token'])
  with open(damaged, 'r+b') as f:
    f.seek(os.path.getsize(damaged) // 2)
    f.write(b'\0' * 64)

  shutil.move(image + '.away', image)
  messages = []
  assert convert(config, workers=1, splits=['val'], log=messages.append,
                 keep_records=True) == config.data_dir
  assert any('2 records of an earlier run found' in m for m in messages), messages
  assert any(m.startswith('records: 2 made, 1 reused, 1 damaged and made again') for m in
             messages), messages
  assert os.stat(os.path.join(records, f'{first["token"]}.npz')).st_mtime_ns == mtimes[
      f'{first["token"]}.npz']
  record_io.load_record(damaged)  # intact again
  stats = json.load(open(os.path.join(out, STATS_FILE)))
  assert stats['frames'] == {'val': 4}
  assert stats['key_frames_without_lidar_points']['count'] == 1
  assert stats['key_frames_without_lidar_points']['tokens'] == [first['token']]
  # A third call finds the finished dataset and does nothing.
  messages.clear()
  convert(config, workers=1, splits=['val'], log=messages.append)
  assert messages == [f'{out} already converted']
  with pytest.raises(ValueError, match='--splits'):
    convert(config, workers=1, splits=['train'])


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_parallel_records_equal_serial(world, tmp_path, method):
  """--workers only changes speed: records made in 2 forked or spawned processes (spawned when
  forking is unsafe) equal the serial ones."""
  from data_prep.nuscenes_nsmae import record_workers
  nusc = _nusc(world)
  location = nusc.log[0]['location']
  tokens = [s['token'] for s in nusc.sample[:2]]
  jobs = [('train', t) for t in tokens]
  out = {}
  for workers in (1, 2):
    records = str(tmp_path / f'w{workers}')
    os.makedirs(os.path.join(records, 'train'))
    state = dict(nusc=nusc, maps={location: _map(nusc, world)}, settings=_settings(),
                 records=records, skip_missing=False, dataroot=world, version='v1.0-trainval',
                 locations=[location])
    outcomes = record_workers.make_records(state, jobs, workers, lambda _: None, method=method)
    assert outcomes == {t: ('made', '') for t in tokens}
    out[workers] = [record_io.load_record(naming.record_path(records, *job)) for job in jobs]
  for a, b in zip(out[1], out[2]):
    for key in ('points', 'cam2lidar', 'bev_map', 'boxes'):
      np.testing.assert_array_equal(a[key], b[key])
    assert a['images'] == b['images']


def test_fork_hazard(monkeypatch):
  """Workers are forked only from a process without threaded runtimes or extra threads."""
  import sys
  import threading
  from data_prep.nuscenes_nsmae import record_workers
  for name in ('jax', 'jaxlib', 'tensorflow', 'torch'):
    monkeypatch.delitem(sys.modules, name, raising=False)
  with monkeypatch.context() as m:  # pytest's process has helper threads of earlier tests
    m.setattr(threading, 'active_count', lambda: 1)
    assert record_workers.fork_hazard() is None
    assert record_workers.start_method() == 'fork'
  stop = threading.Event()
  thread = threading.Thread(target=stop.wait)
  thread.start()
  try:
    assert 'threads' in record_workers.fork_hazard()
    assert record_workers.start_method() == 'spawn'
  finally:
    stop.set()
    thread.join()
  monkeypatch.setitem(sys.modules, 'jax', sys)
  assert record_workers.fork_hazard() == 'jax imported'


def test_partial_download_skip_missing_and_bad_points(world, tmp_path):
  """--skip_missing: key frames with a missing image or sweep are skipped and listed with the
  file; NaN / inf / absurd LiDAR values are dropped and counted; nothing bad reaches a shard."""
  import tensorflow_datasets as tfds
  from data_prep.convert_nuscenes import STATS_FILE, convert
  nusc = _nusc(world)
  samples = _val_samples(nusc, world)
  image = _file_of(nusc, samples[1]['data']['CAM_BACK'])
  sweep = _file_of(nusc, nusc.get('sample_data', samples[2]['data']['LIDAR_TOP'])['prev'])
  os.remove(image)
  os.remove(sweep)
  lidar = _file_of(nusc, samples[3]['data']['LIDAR_TOP'])
  points = np.fromfile(lidar, np.float32).reshape(-1, 5)
  points[0, 0], points[1, 2], points[2, 3] = np.nan, np.inf, -np.inf
  points[3, 1], points[4, 0] = 2e4, -1e9  # absurd: farther than record.MAX_ABS_COORD
  points.tofile(lidar)

  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=world,
                       bev_half_extent=8.0).data
  with pytest.raises(record_lib.MissingInputError, match=samples[1]['token']):
    convert(config, workers=1, splits=['val'])  # without the flag, the first gap stops it
  convert(config, workers=1, splits=['val'], skip_missing=True)
  out = naming.dataset_dir(config.data_dir, config)
  stats = json.load(open(os.path.join(out, STATS_FILE)))
  assert stats['frames'] == {'val': 2}
  assert stats['skipped_key_frames']['count'] == 2
  assert stats['skipped_key_frames']['frames'] == [
      {'split': 'val', 'token': samples[1]['token'], 'missing': image},
      {'split': 'val', 'token': samples[2]['token'], 'missing': sweep}]
  assert stats['invalid_lidar_points']['count'] == 5
  assert stats['invalid_lidar_points']['per_frame'] == {samples[3]['token']: 5}
  builder = tfds.builder_from_directory(out)
  examples = list(tfds.as_numpy(builder.as_dataset(split='val')))
  assert sorted(e['token'].decode() for e in examples) == sorted(
      s['token'] for s in (samples[0], samples[3]))
  for e in examples:
    assert np.all(np.isfinite(e['points'])) and np.abs(e['points'][:, :3]).max() < 1e3
  # Exactly the devkit's points minus the five bad ones.
  from nuscenes.utils.data_classes import LidarPointCloud
  cloud, _ = LidarPointCloud.from_file_multisweep(nusc, samples[3], 'LIDAR_TOP', 'LIDAR_TOP',
                                                  nsweeps=2)
  got = next(e for e in examples if e['token'].decode() == samples[3]['token'])['points']
  assert len(got) == cloud.points.shape[1] - 5
  np.testing.assert_array_equal(got, record_lib.load_points(nusc, samples[3], 2)[0])


def _edit_table(world, table, token, **fields):
  path = os.path.join(world, 'v1.0-trainval', f'{table}.json')
  rows = json.load(open(path))
  row = next(r for r in rows if r['token'] == token)
  row.update(fields)
  json.dump(rows, open(path, 'w'))


@pytest.mark.parametrize('field, value, problem', [
    ('camera_intrinsic', [[1000.0, 0.0], [0.0, 1000.0]], 'not a finite 3x3'),
    ('camera_intrinsic', [[0.0, 0.0, 100.0], [0.0, 0.0, 50.0], [0.0, 0.0, 1.0]],
     'not a camera matrix'),
    ('rotation', [0.0, 0.0, 0.0, 0.0], 'zero quaternion'),
    ('translation', [1.0, 2.0], 'not 3 finite numbers'),
    ('rotation', [1.0, 0.0, float('nan'), 0.0], 'not 4 finite numbers'),
])
def test_bad_calibration_names_sample_and_table(world, field, value, problem):
  nusc = _nusc(world)
  sample = nusc.sample[5]
  sd = nusc.get('sample_data', sample['data']['CAM_FRONT_LEFT'])
  _edit_table(world, 'calibrated_sensor', sd['calibrated_sensor_token'], **{field: value})
  nusc = _nusc(world)
  with pytest.raises(record_lib.BadInputError) as info:
    record_lib.make_record(nusc, _map(nusc, world), sample['token'], _settings())
  message = str(info.value)
  assert problem in message and field in message
  assert sample['token'] in message and sd['calibrated_sensor_token'] in message
  assert 'calibrated_sensor.json' in message


def test_image_of_the_wrong_size_names_sample_and_file(world):
  """Documented choice: an error, not a resize (the intrinsics may be for either size)."""
  import cv2
  nusc = _nusc(world)
  sample = nusc.sample[5]
  path = _file_of(nusc, sample['data']['CAM_BACK_RIGHT'])
  image = cv2.imread(path)
  cv2.imwrite(path, cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2)))
  with pytest.raises(record_lib.BadInputError) as info:
    record_lib.make_record(nusc, _map(nusc, world), sample['token'], _settings())
  assert path in str(info.value) and sample['token'] in str(info.value)
  assert f'{WORLD["image_width"]}x{WORLD["image_height"]}' in str(info.value)


def _one_scene_mini(tmp_path, scene_name: str) -> str:
  """A one-scene dataroot with v1.0-mini tables whose scene has an official mini name and no
  splits.json (so the official mini_train / mini_val splits apply)."""
  from data_prep.make_synthetic import generate
  root = generate(str(tmp_path / 'mini'), num_scenes=1, val_scenes=0, frames_per_scene=2,
                  sweeps_per_frame=0, image_width=64, image_height=36, version='v1.0-mini')
  os.remove(os.path.join(root, 'v1.0-mini', 'splits.json'))
  path = os.path.join(root, 'v1.0-mini', 'scene.json')
  scenes = json.load(open(path))
  scenes[0]['name'] = scene_name
  json.dump(scenes, open(path, 'w'))
  return root


@pytest.mark.slow
def test_one_scene_mini_converts_train(tmp_path):
  """Done-when: --splits=train on a one-scene v1.0-mini dataroot converts; its empty official
  mini_val split is skipped with a warning; asking for only empty splits is an error."""
  import tensorflow_datasets as tfds
  from nuscenes.utils import splits
  from data_prep.convert_nuscenes import STATS_FILE, convert
  name = splits.create_splits_scenes()['mini_train'][0]
  root = _one_scene_mini(tmp_path, name)
  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=root, version='v1.0-mini',
                       num_sweeps=1, bev_half_extent=8.0).data
  with pytest.raises(ValueError, match='none of the scenes of the splits'):
    convert(config, splits=['val'])
  messages = []
  convert(config, splits=['train'], log=messages.append)
  out = naming.dataset_dir(config.data_dir, config)
  assert not any('skipping' in m for m in messages)  # val was not asked for
  builder = tfds.builder_from_directory(out)
  assert builder.info.splits['train'].num_examples == 2
  assert [e['scene_name'] for e in tfds.as_numpy(builder.as_dataset(split='train'))] == [
      name.encode()] * 2
  # Without --splits: every official split; the empty mini_val one is skipped with a warning.
  config = dataclasses.replace(config, data_dir=str(tmp_path / 'tfds_all'))
  messages.clear()
  convert(config, log=messages.append)
  assert any(m.startswith("warning: skipping split 'val'") for m in messages), messages
  out = naming.dataset_dir(config.data_dir, config)
  assert json.load(open(os.path.join(out, STATS_FILE)))['skipped_splits'] == {
      'val': f'none of its scenes are in {root}/v1.0-mini'}
  convert(config, splits=['train', 'val'])  # the existing dataset answers for both
