"""The command line: generated flags, flagfiles that include flagfiles, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments import flags as nsflags
from nsmae_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ['workdir', 'data_dir', 'num_train_steps', 'per_device_batch_size', 'learning_rate',
            'seed', 'log_every_steps', 'checkpoint_every_steps', 'image_mask_ratio',
            'lidar_mask_ratio']


def _parse(*argv):
  nsflags.FLAGS.unparse_flags()
  nsflags.FLAGS(['prog', *argv])
  try:
    return nsflags.config_from_flags()
  finally:
    nsflags.FLAGS.unparse_flags()


def _pretrain(*argv):
  return subprocess.run([sys.executable, '-m', 'experiments.pretrain', *argv], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_every_config_field_is_a_flag_with_help():
  names = nsflags.flag_names()
  assert set(REQUIRED) <= set(names)
  for _, field in config_lib.all_fields():
    assert nsflags.FLAGS[field.name].help == field.metadata['help']
    assert nsflags.FLAGS[field.name].default == field.default


def test_flagfile_can_include_another_and_later_flags_win(tmp_path):
  child = tmp_path / 'child.flags'
  child.write_text(f'--flagfile={ROOT}/experiments/configs/demo.flags\n--num_train_steps=7\n'
                   '--lidar_mask_ratio=0.9\n')
  config = _parse(f'--flagfile={child}', '--seed=3')
  assert config.train.num_train_steps == 7
  assert config.model.lidar_mask_ratio == 0.9
  assert config.train.seed == 3
  assert config.data.image_width == 176  # from demo.flags, through the include


@pytest.mark.parametrize('name', ['demo', 'full'])
def test_shipped_flagfiles_parse_and_validate(name, tmp_path):
  extra = [f'--data_dir={tmp_path}'] if name == 'full' else []
  config = _parse(f'--flagfile={ROOT}/experiments/configs/{name}.flags', *extra)
  assert config.data.image_height % config.model.patch_size == 0


@pytest.mark.parametrize('argv, message', [
    (['--per_device_batch_size=-2'], '--per_device_batch_size: must be > 0, got -2'),
    (['--image_mask_ratio=1.0'], '--image_mask_ratio: must be in [0, 1), got 1.0'),
    (['--lidar_mask_ratio=-0.1'], '--lidar_mask_ratio: must be in [0, 1), got -0.1'),
    (['--image_width=100'], '--image_width: 100 is not divisible by --patch_size=8'),
    (['--nosynthetic', '--data_dir=/no/such/dir'], "--data_dir: directory '/no/such/dir' does "
     'not exist'),
])
def test_bad_values_name_the_flag(argv, message):
  with pytest.raises(config_lib.ConfigError) as err:
    _parse(*argv)
  assert str(err.value).startswith(message)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_entry_point_help_errors_and_exit_codes():
  help_out = _pretrain('--help')  # absl exits 1 after printing help
  assert 'NS-MAE pre-training' in help_out.stdout
  for name in REQUIRED:
    assert f'--{name}:' in help_out.stdout, name
  bad = _pretrain('--flagfile=experiments/configs/demo.flags', '--per_device_batch_size=-1')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      'error: --per_device_batch_size: must be > 0, got -1']
  unknown = _pretrain('--no_such_flag=1')
  assert unknown.returncode != 0
  assert 'no_such_flag' in unknown.stderr.splitlines()[0]
