"""ensure_dataset: reuse, generate + convert for --synthetic, clear error otherwise."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os
import shutil
import subprocess
import sys

import pytest

from helpers import tiny_config
from data_prep import prepare
from nsmae_jax.data import naming


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
  """Generation and conversion run as `python -m` commands with the config's settings."""
  calls = []

  def run_module(args, log=print):
    del log
    calls.append(list(args))
    if args[0] == 'data_prep.make_synthetic':
      os.makedirs(os.path.join(tmp_path / 'world', 'v1.0-trainval'))
    else:
      os.makedirs(naming.dataset_dir(str(tmp_path / 'tfds'), config.data))
      open(os.path.join(naming.dataset_dir(str(tmp_path / 'tfds'), config.data),
                        'dataset_info.json'), 'w').close()

  monkeypatch.setattr(prepare, 'run_module', run_module)
  config = tiny_config(data_dir=str(tmp_path / 'tfds'), dataroot=str(tmp_path / 'world'),
                       synthetic=True, num_sweeps=3, synthetic_scenes=5,
                       synthetic_val_scenes=2, synthetic_frames_per_scene=7, convert_workers=2)
  assert prepare.ensure_dataset(config, log=lambda _: None) == str(tmp_path / 'tfds')
  world = str(tmp_path / 'world')
  assert calls[0] == ['data_prep.make_synthetic', f'--out={world}', '--version=v1.0-trainval',
                      '--num_scenes=5', '--val_scenes=2', '--frames_per_scene=7',
                      '--sweeps_per_frame=2', '--image_width=400', '--image_height=225',
                      '--seed=0', '--workers=2']
  assert calls[1] == ['data_prep.convert_nuscenes', f'--dataroot={world}',
                      '--version=v1.0-trainval', f'--out={tmp_path / "tfds"}',
                      '--image_height=32', '--image_width=88', '--num_sweeps=3',
                      '--bev_half_extent=32.0', '--bev_resolution=0.5', '--workers=2']
  # An existing dataroot is converted without regenerating it; a finished dataset is reused.
  calls.clear()
  shutil.rmtree(tmp_path / 'tfds')
  prepare.ensure_dataset(config, log=lambda _: None)
  assert [c[0] for c in calls] == ['data_prep.convert_nuscenes']
  calls.clear()
  prepare.ensure_dataset(config, log=lambda _: None)
  assert not calls


@pytest.mark.slow
def test_failed_command_is_an_error_with_its_message():
  with pytest.raises(RuntimeError) as info:
    prepare.run_module(['data_prep.make_synthetic', '--out=', '--num_scenes=1'],
                       log=lambda _: None)
  assert 'exit status 2' in str(info.value)
  assert 'error: --out: required' in str(info.value)


# Runs in every Python process of the test's tree (PYTHONPATH): records each fork made while
# a threaded runtime is loaded or other Python threads run, i.e. a fork that may deadlock.
_FORK_WATCH = """
import os, sys, threading
def _watch():
  loaded = [m for m in ('jax', 'jaxlib', 'tensorflow') if m in sys.modules]
  if loaded or threading.active_count() > 1:
    with open(os.environ['FORK_WATCH_LOG'], 'a') as f:
      f.write(f'{os.getpid()} {sys.argv[:2]} forked with {loaded} '
              f'{threading.active_count()} threads\\n')
os.register_at_fork(before=_watch)
"""

_ENSURE_AFTER_JAX = """
import sys
import jax
jax.devices()  # as experiments/data.py: the backend (and its threads) is up
sys.path.insert(0, 'tests')
from helpers import tiny_config
from data_prep import prepare
config = tiny_config(data_dir=sys.argv[1], dataroot=sys.argv[2], synthetic=True,
                     synthetic_scenes=2, synthetic_val_scenes=1, synthetic_frames_per_scene=2,
                     synthetic_image_width=128, synthetic_image_height=72, num_sweeps=2,
                     bev_half_extent=8.0, convert_workers=2)
prepare.ensure_dataset(config, log=print)
assert prepare.dataset_exists(config)
"""


@pytest.mark.slow
def test_demo_data_path_never_forks_a_threaded_process(tmp_path):
  """ensure_dataset in a process that imported JAX (the entry points' path) generates and
  converts with worker processes, and no process forks while JAX/TF or extra threads live
  (Python >= 3.12 warns there: 'use of fork() may lead to deadlocks'; -W makes that fatal)."""
  watch = tmp_path / 'watch'
  watch.mkdir()
  (watch / 'sitecustomize.py').write_text(_FORK_WATCH)
  log = tmp_path / 'forks.log'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, FORK_WATCH_LOG=str(log),
             PYTHONPATH=os.pathsep.join([str(watch), repo]))
  result = subprocess.run(
      [sys.executable, '-W', 'error::DeprecationWarning:multiprocessing.popen_fork', '-c',
       _ENSURE_AFTER_JAX, str(tmp_path / 'tfds'), str(tmp_path / 'world')],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '2 workers, fork)' in result.stdout  # the converter's workers were forked...
  assert not log.exists(), log.read_text()  # ...from no threaded process
