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


def test_label_efficiency_flagfiles_parse_and_the_detection_one_includes_the_base(monkeypatch):
  """Both CPU grid flagfiles parse with the grid runner's flags (run from the repository root,
  as their usage lines say); the detection protocol keeps the base protocol's model and recipe
  and changes only the world size, the paths, the task and the fine-tuning steps."""
  # Registers the runner's own flags (--tasks, --results_dir, ...) beside the config's.
  from experiments import label_efficiency  # noqa: F401  pylint: disable=unused-import
  monkeypatch.chdir(ROOT)
  base = _parse('--flagfile=experiments/configs/label_efficiency_cpu.flags')
  det = _parse('--flagfile=experiments/configs/label_efficiency_cpu_det3d.flags')
  assert det.data.synthetic_scenes == 102 and base.data.synthetic_scenes == 14
  assert det.data.synthetic_val_scenes == base.data.synthetic_val_scenes == 2
  assert det.data.data_dir != base.data.data_dir and det.data.dataroot != base.data.dataroot
  assert det.model == base.model and det.render == base.render
  nsflags.FLAGS(['prog', '--flagfile=experiments/configs/label_efficiency_cpu_det3d.flags'])
  try:
    assert nsflags.FLAGS.tasks == ['det3d'] and nsflags.FLAGS.finetune_steps == 600
    assert nsflags.FLAGS.pretrain_steps == 3000 and nsflags.FLAGS.seeds == ['0', '1', '2']
    assert nsflags.FLAGS.results_dir != 'runs/label_efficiency_cpu'
  finally:
    nsflags.FLAGS.unparse_flags()
