"""Names and paths of the `nuscenes_nsmae` dataset (no TensorFlow import, safe before fork)."""

from __future__ import annotations

import os
from typing import Any

NAME = 'nuscenes_nsmae'
VERSION = '1.0.0'


def _num(x: float) -> str:
  """A float as a config-name-safe token: 0.5 -> 0p5, 32.0 -> 32."""
  return f'{x:g}'.replace('.', 'p').replace('-', 'm')


def config_name(data_config: Any) -> str:
  """The builder config name for a DataConfig (or anything with the same fields).

  It identifies everything that changes the stored bytes: nuScenes version, image size,
  sweeps, BEV extent and resolution; e.g. `trainval_64x176_sw1_e32_r0p5`.
  """
  version = data_config.version.replace('v1.0-', '').replace('.', 'p')
  return (f'{version}_{data_config.image_height}x{data_config.image_width}'
          f'_sw{data_config.num_sweeps}_e{_num(data_config.bev_half_extent)}'
          f'_r{_num(data_config.bev_resolution)}')


def dataset_dir(data_dir: str, data_config: Any) -> str:
  """The finished dataset of a DataConfig: <data_dir>/nuscenes_nsmae/<config>/<VERSION>.

  Readable without project code: tfds.builder_from_directory(dataset_dir(...)).
  """
  return os.path.join(data_dir, NAME, config_name(data_config), VERSION)


def record_dir(data_dir: str, data_config: Any) -> str:
  """Scratch directory of the converter's per-key-frame records (deleted after a build)."""
  return os.path.join(data_dir, f'{NAME}_records', config_name(data_config))


def record_path(records: str, split: str, token: str) -> str:
  """Where the converter keeps the record file of one key frame of a split.

  The sample token names the key frame; the split's order lives in the converter's token list.
  The format (data_prep.nuscenes_nsmae.record_io) is an .npz read without pickle.
  """
  return os.path.join(records, split, f'{token}.npz')
