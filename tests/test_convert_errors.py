"""Bad input and interruption: errors name the file and sample; a rerun resumes."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import json
import os
import shutil

import numpy as np
import pytest

from helpers import tiny_config
from nsmae_jax.data import naming
from data_prep.nuscenes_nsmae import record as record_lib


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


def test_interrupted_conversion_resumes(world, tmp_path):
  """A conversion that dies midway leaves no dataset that looks complete; the rerun reuses the
  finished records (same files, untouched) and finishes, counting an empty key frame."""
  from data_prep.convert_nuscenes import STATS_FILE, convert
  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=world,
                       bev_half_extent=8.0).data
  nusc = _nusc(world)
  val_scene = json.load(open(os.path.join(world, 'v1.0-trainval', 'splits.json')))['val'][0]
  scene = next(s for s in nusc.scene if s['name'] == val_scene)
  first = nusc.get('sample', scene['first_sample_token'])
  third = nusc.get('sample', nusc.get('sample', first['next'])['next'])
  image = _file_of(nusc, third['data']['CAM_FRONT'])
  shutil.move(image, image + '.away')
  open(_file_of(nusc, first['data']['LIDAR_TOP']), 'wb').close()  # an empty key frame

  with pytest.raises(record_lib.MissingInputError, match=third['token']):
    convert(config, workers=1, splits=['val'], keep_records=True)
  out = naming.dataset_dir(config.data_dir, config)
  assert not os.path.exists(os.path.join(out, 'dataset_info.json'))
  records = os.path.join(naming.record_dir(config.data_dir, config), 'val')
  done = sorted(f for f in os.listdir(records) if f.endswith('.pkl'))
  assert len(done) == 2 and not [f for f in os.listdir(records) if '.tmp' in f]
  mtimes = {f: os.stat(os.path.join(records, f)).st_mtime_ns for f in done}

  shutil.move(image + '.away', image)
  messages = []
  assert convert(config, workers=1, splits=['val'], log=messages.append,
                 keep_records=True) == config.data_dir
  assert any('2 already done' in m for m in messages), messages
  assert {f: os.stat(os.path.join(records, f)).st_mtime_ns for f in done} == mtimes
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


def test_parallel_records_equal_serial(world, tmp_path):
  """--workers only changes speed: records made in 2 processes equal the serial ones."""
  import pickle
  from data_prep import convert_nuscenes
  nusc = _nusc(world)
  maps = {nusc.log[0]['location']: _map(nusc, world)}
  tokens = [s['token'] for s in nusc.sample[:4]]
  jobs = [('train', i, t) for i, t in enumerate(tokens)]
  out = {}
  for workers in (1, 2):
    records = str(tmp_path / f'w{workers}')
    os.makedirs(os.path.join(records, 'train'))
    convert_nuscenes._make_records(nusc, maps, _settings(), records, jobs, len(jobs), workers,
                                   lambda _: None)
    out[workers] = [pickle.load(open(naming.record_path(records, *job), 'rb')) for job in jobs]
  for a, b in zip(out[1], out[2]):
    for key in ('points', 'cam2lidar', 'bev_map', 'boxes'):
      np.testing.assert_array_equal(a[key], b[key])
    assert a['images'] == b['images']
