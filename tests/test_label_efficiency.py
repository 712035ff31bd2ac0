"""The label-efficiency grid: plan order, resumability (finished cells are skipped), pre-training
once, and the CSV / markdown / PNG summary."""

from __future__ import annotations

import csv
import json
import os

import pytest

from helpers import tiny_config
from experiments import label_efficiency as le
from nsmae_jax.finetune.metrics import MAP_CLASSES


def test_plan_is_seed_major_with_ablations_last():
  cells = le.plan([0.01, 1.0], [0, 1], ablations=['no_mask'], ablation_fraction=0.05)
  assert cells[:4] == [('scratch', 0.01, 0), ('pretrained', 0.01, 0), ('scratch', 1.0, 0),
                       ('pretrained', 1.0, 0)]
  assert cells[4][2] == 1 and len(cells) == 8 + 2
  assert cells[-2:] == [('pretrained:no_mask', 0.05, 0), ('pretrained:no_mask', 0.05, 1)]


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces pre-training and fine-tuning by instant fakes that record their configs."""
  calls = {'pretrain': [], 'finetune': []}

  def save_config(config, workdir):  # as the training loop does when a job starts
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f)

  def fake_pretrain(config, workdir):
    calls['pretrain'].append(config)
    save_config(config, workdir)
    return {'loss': 1.0}

  def fake_finetune(config, workdir):
    calls['finetune'].append(config)
    fc = config.finetune
    miou = fc.label_fraction * 0.5 + (0.1 if fc.init_workdir else 0.0) + 0.01 * config.train.seed
    result = {'eval_miou': miou, **{f'eval_iou/{c}': miou for c in MAP_CLASSES}}
    save_config(config, workdir)
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f)
    return result

  import experiments.finetune_bevseg as ft  # pylint: disable=import-outside-toplevel
  import nsmae_jax.train as train  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(ft, 'finetune', fake_finetune)
  monkeypatch.setattr(train, 'train_and_evaluate', fake_pretrain)
  return calls


def test_grid_runs_pretraining_once_and_resumes(tmp_path, fake_training):
  config = tiny_config(str(tmp_path), num_train_steps=9)
  out = str(tmp_path / 'docs' / 'le')
  kw = dict(pretrain_steps=50, finetune_steps=7, finetune_learning_rate=3e-4, out_prefix=out,
            log=lambda s: None, in_process=True)
  rows = le.run_grid(config, str(tmp_path / 'res'), [0.05, 1.0], [0, 1], **kw)
  assert len(rows) == 8
  assert len(fake_training['pretrain']) == 1
  assert fake_training['pretrain'][0].train.num_train_steps == 50
  ft = fake_training['finetune']
  assert len(ft) == 8
  # Same steps at every fraction; whole val split; scratch loads nothing.
  assert {c.train.num_train_steps for c in ft} == {7}
  assert {c.train.eval_batches for c in ft} == {0}
  assert {c.train.learning_rate for c in ft} == {3e-4}
  assert {c.finetune.init_workdir for c in ft} == {'', le.pretrain_dir(str(tmp_path / 'res'))}
  assert all(c.finetune.subset_seed == c.train.seed for c in ft)
  # A second invocation finds every cell finished: nothing runs again.
  le.run_grid(config, str(tmp_path / 'res'), [0.05, 1.0], [0, 1], **kw)
  assert len(fake_training['pretrain']) == 1 and len(fake_training['finetune']) == 8
  # Removing one result re-runs exactly that cell.
  os.remove(os.path.join(str(tmp_path / 'res'), le.cell_name('pretrained', 1.0, 1),
                         'result.json'))
  le.run_grid(config, str(tmp_path / 'res'), [0.05, 1.0], [0, 1], **kw)
  assert len(fake_training['finetune']) == 9
  last = fake_training['finetune'][-1]
  assert (last.finetune.label_fraction, last.train.seed) == (1.0, 1)

  with open(out + '.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 8 and set(table[0]) == set(le.CSV_FIELDS)
  md = open(out + '.md').read()
  # fraction 5%: scratch 0.025 + {0, .01} -> 3.0 %, pre-trained +10 points -> gain +10.00.
  assert '| 5% | 3.00 +- 0.71 (n=2) | 13.00 +- 0.71 (n=2) | +10.00 | +10.00, +10.00 |' in md
  assert os.path.getsize(out + '.png') > 1000


def test_resuming_with_other_settings_names_the_cell_and_flag(tmp_path, fake_training):
  """A grid resumed with another protocol must not silently reuse the old cells."""
  from nsmae_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(tmp_path))
  res = str(tmp_path / 'res')
  kw = dict(pretrain_steps=5, finetune_steps=7, log=lambda s: None, in_process=True)
  le.run_grid(config, res, [1.0], [0], **kw)
  assert len(fake_training['finetune']) == 2
  with pytest.raises(ConfigError, match=r"ft_scratch_f1_s0 was run with other settings "
                                        r"\(--num_train_steps: 7 there, 9 now\)"):
    le.run_grid(config, res, [1.0], [0], **dict(kw, finetune_steps=9))
  with pytest.raises(ConfigError, match=r"pretrain was run with other settings "
                                        r"\(--num_train_steps: 5 there, 6 now\)"):
    le.run_grid(config, res, [1.0], [0], **dict(kw, pretrain_steps=6))
  # Settings that cannot change a result (logging cadence) still count as the same run.
  le.run_grid(config.replace(log_every_steps=3), res, [1.0], [0], **kw)
  assert len(fake_training['finetune']) == 2 and len(fake_training['pretrain']) == 1


def test_ablation_cells_pretrain_with_the_switch_off(tmp_path, fake_training):
  config = tiny_config(str(tmp_path))
  le.run_grid(config, str(tmp_path / 'res'), [1.0], [0], inits=('pretrained',),
              ablations=('no_mask', 'no_bev'), ablation_fraction=0.05, log=lambda s: None,
              in_process=True)
  pre = fake_training['pretrain']
  assert len(pre) == 3
  assert pre[1].model.image_mask_ratio == 0.0 and pre[1].model.lidar_mask_ratio == 0.0
  assert pre[2].loss.bev_color_weight == 0.0 and pre[2].loss.bev_depth_weight == 0.0
  assert pre[2].loss.perspective_color_weight == config.loss.perspective_color_weight
  ab = [c for c in fake_training['finetune'] if 'no_mask' in c.finetune.init_workdir]
  assert len(ab) == 1 and ab[0].finetune.label_fraction == 0.05
  with pytest.raises(ValueError, match='--ablations: unknown ablation'):
    le.run_grid(config, str(tmp_path / 'res'), [1.0], [0], ablations=('no_lidar',),
                log=lambda s: None, in_process=True)
