"""Record files of the converter: round trip, no code execution, damage is an error naming the
file; the TFDS builder accepts the default config (no world needed: fast)."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os
import pickle
import zipfile

import numpy as np
import pytest

from data_prep.nuscenes_nsmae import record_io


def _record(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {'token': 'a' * 32, 'scene_name': 'scene-0061', 'timestamp': np.int64(1533151603547590),
          'images': [bytes(rng.integers(0, 256, 50 + k, dtype=np.uint8)) for k in range(6)],
          'intrinsics': rng.normal(size=(6, 3, 3)).astype(np.float32),
          'cam2lidar': rng.normal(size=(6, 4, 4)).astype(np.float32),
          'lidar2ego': np.eye(4, dtype=np.float32), 'ego2global': np.eye(4, dtype=np.float32),
          'points': rng.normal(size=(300, 5)).astype(np.float32),
          'bev_map': (rng.uniform(size=(6, 16, 16)) > 0.5).astype(np.uint8),
          'boxes': rng.normal(size=(3, 9)).astype(np.float32),
          'box_labels': np.array([0, 5, 9], np.int32), 'invalid_points': 7}


def test_round_trip(tmp_path):
  path = str(tmp_path / 'r.npz')
  rec = _record()
  record_io.save_record(path, rec)
  assert os.listdir(tmp_path) == ['r.npz']  # the temporary name was renamed
  got = record_io.load_record(path)
  assert set(got) == set(record_io.FEATURE_KEYS) | set(record_io.EXTRA_KEYS)
  assert got['images'] == rec['images'] and got['token'] == rec['token']
  assert got['scene_name'] == rec['scene_name'] and got['timestamp'] == rec['timestamp']
  assert got['invalid_points'] == 7
  for key in ('intrinsics', 'cam2lidar', 'points', 'bev_map', 'boxes', 'box_labels'):
    np.testing.assert_array_equal(got[key], rec[key])
    assert got[key].dtype == rec[key].dtype
  assert set(record_io.features_only(got)) == set(record_io.FEATURE_KEYS)


class _Payload:
  """Unpickling this runs code: it creates the file named by `marker`."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, 'w')


def _damaged(kind: str, path: str, tmp_path) -> None:
  """Writes a damaged or hostile record file of the given kind to path."""
  marker = str(tmp_path / 'code_ran')
  if kind == 'pickle':  # the old record format, or an attacker's file
    with open(path, 'wb') as f:
      pickle.dump({'token': _Payload(marker)}, f)
  elif kind == 'object_array':  # an .npz whose array unpickles on read
    arrays = record_io._to_arrays(_record())  # pylint: disable=protected-access
    arrays['points'] = np.array([_Payload(marker)], dtype=object)
    with open(path, 'wb') as f:
      np.savez(f, **arrays)
  elif kind == 'bare_npy':
    np.save(path, np.zeros(3))
    os.replace(path + '.npy', path)
  else:
    record_io.save_record(path, _record())
    data = bytearray(open(path, 'rb').read())
    if kind == 'truncated':  # a half-written file copied in by hand
      data = data[:len(data) // 2]
    elif kind == 'flipped_byte':  # a bit flip inside the points array
      with zipfile.ZipFile(path) as z:
        info = z.getinfo('points.npy')
      data[info.header_offset + 200] ^= 0xFF
    elif kind == 'edited':  # a consistent .npz whose values were changed after writing
      with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
      arrays['boxes'] = arrays['boxes'] + 1
      with open(path, 'wb') as f:
        np.savez(f, **arrays)
      return
    with open(path, 'wb') as f:
      f.write(bytes(data))


@pytest.mark.parametrize('kind', ['pickle', 'object_array', 'bare_npy', 'truncated',
                                  'flipped_byte', 'edited'])
def test_damaged_record_is_an_error_naming_the_file(tmp_path, kind):
  path = str(tmp_path / 'rec.npz')
  _damaged(kind, path, tmp_path)
  with pytest.raises(record_io.CorruptRecordError) as info:
    record_io.load_record(path)
  assert path in str(info.value)
  assert not os.path.exists(tmp_path / 'code_ran')


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
  """A write that fails midway (e.g. ENOSPC) leaves neither the record nor a temporary."""
  path = str(tmp_path / 'r.npz')

  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(np, 'savez', full)
  with pytest.raises(OSError, match='No space'):
    record_io.save_record(path, _record())
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_builder_accepts_the_default_config(tmp_path):
  """The converter's default flags make config trainval_64x176_sw1_e32_r0p5; TFDS refused it
  as a custom config named like a listed one."""
  from data_prep.nuscenes_nsmae import nuscenes_nsmae_dataset_builder as builder_lib
  from nsmae_jax.config import DataConfig
  config = builder_lib.builder_config(DataConfig(data_dir=str(tmp_path)))
  assert config.name == 'trainval_64x176_sw1_e32_r0p5'
  builder = builder_lib.Builder(config=config, data_dir=str(tmp_path))
  assert builder.builder_config.name == config.name
  assert builder.info.features['images'].shape == (6, 64, 176, 3)
