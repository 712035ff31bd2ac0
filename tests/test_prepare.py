"""ensure_dataset: reuse, generate + convert for --synthetic, clear error otherwise."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os

import pytest

from helpers import tiny_config
from data_prep import prepare


def test_existing_dataset_is_reused(converted_data_dir, synthetic_dataroot, monkeypatch):
  import data_prep.convert_nuscenes as convert_lib
  monkeypatch.setattr(convert_lib, 'convert', lambda *a, **k: pytest.fail('converted again'))
  config = tiny_config(data_dir=converted_data_dir, dataroot=synthetic_dataroot, synthetic=False)
  assert prepare.ensure_dataset(config) == converted_data_dir


def test_missing_dataset_without_synthetic_names_data_dir(tmp_path):
  config = tiny_config(data_dir=str(tmp_path / 'nothing'), synthetic=False)
  with pytest.raises(FileNotFoundError, match='--data_dir'):
    prepare.ensure_dataset(config)


def test_synthetic_generates_then_converts(tmp_path, monkeypatch):
  import data_prep.convert_nuscenes as convert_lib
  import data_prep.make_synthetic as synth_lib
  calls = []

  def generate(out, **kw):
    calls.append(('generate', out, kw))
    os.makedirs(os.path.join(out, 'v1.0-trainval'))
    return out

  def convert(data_config, workers=1, splits=None, log=None):
    calls.append(('convert', data_config.dataroot, workers))
    return data_config.data_dir

  monkeypatch.setattr(synth_lib, 'generate', generate)
  monkeypatch.setattr(convert_lib, 'convert', convert)
  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=str(tmp_path / 'world'),
                       synthetic=True, num_sweeps=3, synthetic_scenes=5,
                       synthetic_val_scenes=2, synthetic_frames_per_scene=7, convert_workers=2)
  assert prepare.ensure_dataset(config, log=lambda _: None) == str(tmp_path / 'tfds')
  assert calls[0] == ('generate', str(tmp_path / 'world'), dict(
      num_scenes=5, val_scenes=2, frames_per_scene=7, sweeps_per_frame=2, image_width=400,
      image_height=225, seed=0, workers=2))
  assert calls[1] == ('convert', str(tmp_path / 'world'), 2)
  # An existing dataroot is converted without regenerating it.
  calls.clear()
  prepare.ensure_dataset(config, log=lambda _: None)
  assert [c[0] for c in calls] == ['convert']
