"""Make sure the converted dataset for a config exists (generate + convert the demo world)."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os
from typing import Callable

from nsmae_jax.config import Config
from nsmae_jax.data import naming


def dataset_exists(config: Config) -> bool:
  """True when the dataset for config.data is fully converted (TFDS renames it when done)."""
  path = naming.dataset_dir(config.data.data_dir, config.data)
  return os.path.isfile(os.path.join(path, 'dataset_info.json'))


def ensure_dataset(config: Config, log: Callable[[str], None] = print) -> str:
  """Returns config.data.data_dir, converting (and for --synthetic generating) it if missing.

  With --synthetic and no dataroot, the procedural world is generated into --dataroot first.
  Without --synthetic a missing dataset is an error naming --data_dir. Conversion resumes
  where an interrupted one stopped (see data_prep.convert_nuscenes).
  """
  d = config.data
  if dataset_exists(config):
    return d.data_dir
  if not d.synthetic:
    raise FileNotFoundError(
        f'--data_dir: no converted nuscenes_nsmae dataset at '
        f'{naming.dataset_dir(d.data_dir, d)}; convert one with `python -m '
        f'data_prep.convert_nuscenes --dataroot=... --version={d.version} --out={d.data_dir}` '
        '(same image size / sweeps / BEV flags), or pass --synthetic for the demo world')

  from data_prep.convert_nuscenes import convert
  if not os.path.isdir(os.path.join(d.dataroot, d.version)):
    from data_prep.make_synthetic import generate
    log(f'generating the synthetic world into {d.dataroot}')
    generate(d.dataroot, num_scenes=d.synthetic_scenes, val_scenes=d.synthetic_val_scenes,
             frames_per_scene=d.synthetic_frames_per_scene,
             sweeps_per_frame=max(d.num_sweeps - 1, 0), image_width=d.synthetic_image_width,
             image_height=d.synthetic_image_height, seed=d.synthetic_seed,
             workers=d.convert_workers)
  log(f'converting {d.dataroot} into {d.data_dir}')
  return convert(d, workers=d.convert_workers, log=log)
