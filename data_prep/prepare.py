"""Make sure the converted dataset for a config exists (generate + convert the demo world).

Generation and conversion run as `python -m data_prep.make_synthetic` and
`python -m data_prep.convert_nuscenes` in a fresh interpreter: the caller (a training entry
point, a notebook) has usually imported JAX or TensorFlow, whose thread pools make the
converter's fork of its record workers unsafe, and a fresh process also gives the conversion's
memory back when it ends.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from nsmae_jax.config import Config
from nsmae_jax.data import naming

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAIL_BYTES = 4000  # of a failed command's stderr, quoted in the error


def dataset_exists(config: Config) -> bool:
  """True when the dataset for config.data is fully converted (TFDS renames it when done)."""
  path = naming.dataset_dir(config.data.data_dir, config.data)
  return os.path.isfile(os.path.join(path, 'dataset_info.json'))


def generate_command(config: Config) -> list[str]:
  """`python -m data_prep.make_synthetic` arguments that write the demo world of config.data."""
  d = config.data
  return ['data_prep.make_synthetic', f'--out={d.dataroot}', f'--version={d.version}',
          f'--num_scenes={d.synthetic_scenes}', f'--val_scenes={d.synthetic_val_scenes}',
          f'--frames_per_scene={d.synthetic_frames_per_scene}',
          f'--sweeps_per_frame={max(d.num_sweeps - 1, 0)}',
          f'--image_width={d.synthetic_image_width}',
          f'--image_height={d.synthetic_image_height}', f'--seed={d.synthetic_seed}',
          f'--workers={max(d.convert_workers, 1)}']


def convert_command(config: Config) -> list[str]:
  """`python -m data_prep.convert_nuscenes` arguments for the dataset of config.data."""
  d = config.data
  return ['data_prep.convert_nuscenes', f'--dataroot={d.dataroot}', f'--version={d.version}',
          f'--out={d.data_dir}', f'--image_height={d.image_height}',
          f'--image_width={d.image_width}', f'--num_sweeps={d.num_sweeps}',
          f'--bev_half_extent={d.bev_half_extent!r}', f'--bev_resolution={d.bev_resolution!r}',
          f'--workers={max(d.convert_workers, 1)}']


def run_module(args: Sequence[str], log: Callable[[str], None] = print) -> None:
  """Runs `python -m <args>` in a fresh interpreter of this environment, in the current
  directory (relative paths keep their meaning), its output passed through.

  Raises RuntimeError with the command and the end of its stderr if it fails.
  """
  cmd = [sys.executable, '-m', *args]
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (_REPO, env.get('PYTHONPATH')) if p)
  log('$ ' + shlex.join(cmd))
  with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as proc:
    tail = b''
    while chunk := proc.stderr.read1(65536):  # progress bars stay live
      sys.stderr.buffer.write(chunk)
      sys.stderr.flush()
      tail = (tail + chunk)[-_TAIL_BYTES:]
  if proc.returncode:
    text = tail.decode(errors='replace').replace('\r', '\n').strip()
    last = [line for line in text.splitlines() if line.strip()][-5:]
    raise RuntimeError(f'{shlex.join(cmd)} failed with exit status {proc.returncode}:\n'
                       + '\n'.join(last))


def ensure_dataset(config: Config, log: Callable[[str], None] = print) -> str:
  """Returns config.data.data_dir, converting (and for --synthetic generating) it if missing.

  With --synthetic and no dataroot, the procedural world is generated into --dataroot first.
  Without --synthetic a missing dataset is an error naming --data_dir. Conversion resumes
  where an interrupted one stopped (see data_prep.convert_nuscenes). Both run in a fresh
  `python -m` process (module docstring).
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
  if not os.path.isdir(os.path.join(d.dataroot, d.version)):
    log(f'generating the synthetic world into {d.dataroot}')
    run_module(generate_command(config), log)
  log(f'converting {d.dataroot} into {d.data_dir}')
  run_module(convert_command(config), log)
  if not dataset_exists(config):  # the command's settings and ours name different datasets
    raise RuntimeError(f'the conversion ended without {naming.dataset_dir(d.data_dir, d)}')
  return d.data_dir
