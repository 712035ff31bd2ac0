"""The label-efficiency grid runner (plan order, resumability: finished cells are skipped,
pre-training once) and its report (CSV / markdown / PNG, also rewritten alone from a results
directory in the format of docs/label_efficiency_cpu.*)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import tiny_config
from experiments import label_efficiency as le
from experiments import label_efficiency_report as report
from nsmae_jax.data.schema import DETECTION_CLASSES, MAP_CLASSES

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _each_plot_drawn_once(monkeypatch):
  """The report's plot (0.2-0.4 s of matplotlib) is not drawn again for the same figure to the
  same file while that file is still the one drawn: the runner rewrites a report after every
  cell and again at its end, and a resumed grid rewrites it unchanged. Any other call draws."""
  draw, drawn = report._plot, {}

  def plot(groups, spec, path, title):
    figure = repr((groups, spec, title))
    if os.path.exists(path):
      st = os.stat(path)
      if drawn.get(path) == (figure, st.st_size, st.st_mtime_ns):
        return
    draw(groups, spec, path, title)
    st = os.stat(path)
    drawn[path] = (figure, st.st_size, st.st_mtime_ns)

  monkeypatch.setattr(report, '_plot', plot)


def test_plan_is_seed_major_with_ablations_last():
  cells = le.plan([0.01, 1.0], [0, 1], ablations=['no_mask'], ablation_fractions=(0.05,))
  assert cells[:4] == [('scratch', 0.01, 0), ('pretrained', 0.01, 0), ('scratch', 1.0, 0),
                       ('pretrained', 1.0, 0)]
  assert cells[4][2] == 1 and len(cells) == 8 + 2
  assert cells[-2:] == [('pretrained:no_mask', 0.05, 0), ('pretrained:no_mask', 0.05, 1)]


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces pre-training and fine-tuning by instant fakes that record their configs."""
  import experiments.finetune_bevseg as ft  # pylint: disable=import-outside-toplevel
  import experiments.finetune_det3d as det  # pylint: disable=import-outside-toplevel
  import nsmae_jax.train as train  # pylint: disable=import-outside-toplevel
  calls = {'pretrain': [], 'finetune': [], 'det3d': []}

  def save_config(config, workdir):  # as the training loop does when a job starts
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f)

  def fake_pretrain(config, workdir, task):
    del task  # the pre-training task the runner built
    calls['pretrain'].append(config)
    save_config(config, workdir)
    return train.TrainResult(state=None, metrics={'loss': 1.0})

  def fake_finetune(config, workdir):
    calls['finetune'].append(config)
    fc = config.finetune
    miou = fc.label_fraction * 0.5 + (0.1 if fc.init_workdir else 0.0) + 0.01 * config.train.seed
    result = {'eval_miou': miou, **{f'eval_iou/{c}': miou for c in MAP_CLASSES}}
    save_config(config, workdir)
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f)
    return result

  def fake_det3d(config, workdir):
    calls['det3d'].append(config)
    fc = config.finetune
    nds = fc.label_fraction * 0.4 + (0.05 if fc.init_workdir else 0.0) + 0.01 * config.train.seed
    result = {'eval_nds': nds, 'eval_map': nds / 2,
              **{f'eval_ap_{c}': nds / 3 for c in DETECTION_CLASSES}}
    save_config(config, workdir)
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f)
    return result

  monkeypatch.setattr(ft, 'finetune', fake_finetune)
  monkeypatch.setattr(det, 'finetune', fake_det3d)
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
  # done.json marks the pre-training finished and keeps its metrics (TrainResult.metrics).
  with open(os.path.join(le.pretrain_dir(str(tmp_path / 'res')), 'done.json')) as f:
    assert json.load(f)['loss'] == 1.0
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
  os.remove(os.path.join(str(tmp_path / 'res'), report.cell_name('pretrained', 1.0, 1),
                         'result.json'))
  le.run_grid(config, str(tmp_path / 'res'), [0.05, 1.0], [0, 1], **kw)
  assert len(fake_training['finetune']) == 9
  last = fake_training['finetune'][-1]
  assert (last.finetune.label_fraction, last.train.seed) == (1.0, 1)

  with open(out + '.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 8 and list(table[0]) == report.CSV_FIELDS
  # The runner stores the steps and the labelled-frame count ('' here: no dataset) with the cell.
  assert [(r['steps'], r['train_frames']) for r in table] == [('7', '')] * 8
  md = open(out + '.md').read()
  # fraction 5%: scratch 0.025 + {0, .01} -> 3.0 %, pre-trained +10 points -> gain +10.00.
  assert '| 5% | 3.00 +- 0.71 (n=2) | 13.00 +- 0.71 (n=2) | +10.00 | +10.00, +10.00 |' in md
  assert os.path.getsize(out + '.png') > 1000
  # The report alone, from the results directory, rewrites the same CSV and table.
  report.write_summary(report.collect(str(tmp_path / 'res')), out + '_alone')
  assert open(out + '_alone.csv').read() == open(out + '.csv').read()
  assert open(out + '_alone.md').read() == md


def test_detection_grid_shares_the_pretraining_and_reports_nds_and_map(tmp_path, fake_training):
  config = tiny_config(str(tmp_path))
  res, out = str(tmp_path / 'res'), str(tmp_path / 'docs' / 'le')
  rows = le.run_grid(config, res, [0.05, 1.0], [0, 1], tasks=('bevseg', 'det3d'),
                     out_prefix=out, log=lambda s: None, in_process=True)
  assert len(fake_training['pretrain']) == 1  # one pre-training for both tasks
  assert len(fake_training['finetune']) == 8 and len(fake_training['det3d']) == 8
  assert os.path.isdir(os.path.join(res, report.cell_name('pretrained', 0.05, 1, 'det3d')))
  assert report.cell_name('pretrained', 0.05, 1, 'det3d').startswith('det3d_')
  assert len(rows) == 8 and {'nds', 'map'} <= set(rows[0])
  with open(out + '_det3d.csv') as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ['init', 'fraction', 'seed', 'nds', 'map', *DETECTION_CLASSES,
                            'train_frames', 'steps', 'wall_s']
  md = open(out + '_det3d.md').read()
  # NDS at 100%: scratch 0.4 + {0, .01} -> 40.50 %, pre-trained +5 points; mAP is half of it.
  assert '# Label efficiency (3D detection NDS, %)' in md
  assert '| 100% | 40.50 +- 0.71 (n=2) | 45.50 +- 0.71 (n=2) | +5.00 | +5.00, +5.00 |' in md
  assert '# Label efficiency (3D detection mAP, %)' in md
  assert '| 100% | 20.25 +- 0.35 (n=2) | 22.75 +- 0.35 (n=2) | +2.50 | +2.50, +2.50 |' in md
  assert os.path.exists(out + '.md') and os.path.getsize(out + '_det3d.png') > 1000
  # Resuming runs nothing; the report alone rewrites the same detection table.
  le.run_grid(config, res, [0.05, 1.0], [0, 1], tasks=('det3d',), out_prefix=out,
              log=lambda s: None, in_process=True)
  assert len(fake_training['det3d']) == 8
  report.write_summary(report.collect(res, task='det3d'), out + '_alone', task='det3d')
  assert open(out + '_alone.md').read() == md
  with pytest.raises(ValueError, match='--tasks: unknown task'):
    le.run_grid(config, res, [1.0], [0], tasks=('segdet',), log=lambda s: None, in_process=True)


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
              ablations=('no_mask', 'no_bev'), ablation_fractions=(0.05,), log=lambda s: None,
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


def test_relative_ablations_and_several_ablation_fractions(tmp_path, fake_training):
  """depth_x10 scales the grid's own depth weights; masked_only and a mask ratio set one field;
  every ablation is fine-tuned at each --ablation_fractions."""
  config = tiny_config(str(tmp_path), bev_depth_weight=0.2, perspective_depth_weight=0.05)
  le.run_grid(config, str(tmp_path / 'res'), [1.0], [0], inits=('scratch',),
              ablations=('depth_x10', 'masked_only', 'lidar_mask_50'),
              ablation_fractions=(0.05, 0.1), log=lambda s: None, in_process=True)
  depth, masked, lidar = fake_training['pretrain']
  assert depth.loss.bev_depth_weight == pytest.approx(2.0)
  assert depth.loss.perspective_depth_weight == pytest.approx(0.5)
  assert depth.loss.bev_color_weight == config.loss.bev_color_weight
  assert masked.loss.masked_loss == 'masked' and masked.model == config.model
  assert lidar.model.lidar_mask_ratio == 0.5
  assert lidar.model.image_mask_ratio == config.model.image_mask_ratio
  cells = sorted((os.path.basename(c.finetune.init_workdir), c.finetune.label_fraction)
                 for c in fake_training['finetune'] if c.finetune.init_workdir)
  assert cells == [(f'pretrain_{a}', f) for a in ('depth_x10', 'lidar_mask_50', 'masked_only')
                   for f in (0.05, 0.1)]
  assert all('-' not in name for name in le.ABLATIONS)


def test_single_modality_grid_has_its_own_cells_and_report_but_the_joint_pretraining(
    tmp_path, fake_training):
  """--modalities=camera: cells ft-camera_... / det3d-camera_... beside the joint ones, restored
  from the one joint pre-training, reported as <out_prefix>[_det3d]_camera.*."""
  res, out = str(tmp_path / 'res'), str(tmp_path / 'docs' / 'le')
  config = tiny_config(str(tmp_path), modalities='camera')
  kw = dict(tasks=('bevseg', 'det3d'), out_prefix=out, log=lambda s: None, in_process=True)
  rows = le.run_grid(config, res, [0.05, 1.0], [0], **kw)
  assert len(rows) == 4 and {'nds', 'map'} <= set(rows[0])
  # One pre-training, joint although the grid fine-tunes camera-only models.
  assert len(fake_training['pretrain']) == 1
  assert fake_training['pretrain'][0].finetune.modalities == report.JOINT
  with open(os.path.join(le.pretrain_dir(res), 'config.json')) as f:
    assert json.load(f)['finetune']['modalities'] == report.JOINT
  ft, det = fake_training['finetune'], fake_training['det3d']
  assert len(ft) == 4 and len(det) == 4
  assert {c.finetune.modalities for c in ft + det} == {'camera'}
  assert {c.finetune.init_workdir for c in ft + det} == {'', le.pretrain_dir(res)}
  cells = sorted(os.path.basename(c.train.workdir) for c in ft + det)
  assert cells == sorted([f'{p}-camera_{i}_f{f:g}_s0' for p in ('ft', 'det3d')
                          for i in ('scratch', 'pretrained') for f in (0.05, 1.0)])
  assert all(os.path.exists(os.path.join(res, c, 'result.json')) for c in cells)
  # Neither grid reads the other's cells.
  assert report.find_cells(res) == [] and report.collect(res, task='det3d') == []
  assert len(report.find_cells(res, modalities='camera')) == 4
  for prefix in (out + '_camera', out + '_det3d_camera'):
    assert os.path.getsize(prefix + '.png') > 1000
    with open(prefix + '.csv') as f:
      assert len(list(csv.DictReader(f))) == 4
  assert not os.path.exists(out + '.csv') and not os.path.exists(out + '_det3d.csv')
  md = open(out + '_camera.md').read()
  assert '# Label efficiency (BEV map segmentation mIoU, %; camera only)' in md
  # fraction 100%: scratch 0.5, pre-trained +10 points (seed 0 only).
  assert '| 100% | 50.00 +- 0.00 (n=1) | 60.00 +- 0.00 (n=1) | +10.00 | +10.00 |' in md
  # Re-running skips every finished cell and the pre-training.
  le.run_grid(config, res, [0.05, 1.0], [0], **kw)
  assert len(fake_training['pretrain']) == 1 and len(ft) == 4 and len(det) == 4
  # The joint grid then shares the same pre-training and runs its own cells.
  le.run_grid(config.replace(modalities=report.JOINT), res, [1.0], [0], out_prefix=out,
              log=lambda s: None, in_process=True)
  assert len(fake_training['pretrain']) == 1 and len(ft) == 6
  assert {os.path.basename(c.train.workdir) for c in ft[4:]} == {
      report.cell_name('scratch', 1.0, 0), report.cell_name('pretrained', 1.0, 0)}
  assert len(report.collect(res)) == 2 and len(report.collect(res, modalities='camera')) == 4
  # Without --out_prefix the report lands in the results directory, also suffixed.
  le.run_grid(tiny_config(str(tmp_path), modalities='lidar'), res, [1.0], [0],
              inits=('pretrained',), log=lambda s: None, in_process=True)
  assert len(fake_training['pretrain']) == 1 and len(ft) == 7
  assert os.path.basename(ft[-1].train.workdir) == 'ft-lidar_pretrained_f1_s0'
  assert os.path.exists(os.path.join(res, 'label_efficiency_lidar.md'))


@pytest.fixture
def fake_drop_eval(monkeypatch):
  """Replaces the sensor-drop evaluation by an instant fake that records (config, workdir,
  task) and, like the real one for segmentation, writes nothing."""
  calls = []

  def fake(config, workdir, task):
    calls.append((config, workdir, task))
    with open(os.path.join(config.train.workdir, 'result.json')) as f:
      trained = json.load(f)
    # Half of the trained cell's headline score.
    if task == 'det3d':
      return {'eval_nds': trained['eval_nds'] / 2, 'eval_map': trained['eval_map'] / 2,
              **{f'eval_ap_{c}': 0.0 for c in DETECTION_CLASSES}}
    return {'eval_miou': trained['eval_miou'] / 2, **{f'eval_iou/{c}': 0.0 for c in MAP_CLASSES}}

  monkeypatch.setattr(le, 'evaluate_dropped', fake)
  return calls


def test_drop_modality_evaluates_each_finished_joint_cell_once(tmp_path, fake_training,
                                                                fake_drop_eval):
  from nsmae_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  res, out = str(tmp_path / 'res'), str(tmp_path / 'docs' / 'le')
  config = tiny_config(str(tmp_path))
  kw = dict(tasks=('bevseg', 'det3d'), finetune_steps=7, out_prefix=out, in_process=True)
  le.run_grid(config, res, [1.0], [0, 1], log=lambda s: None, **kw)
  assert len(fake_training['finetune']) == 4 and len(fake_training['det3d']) == 4
  # The drop grid also names fraction 0.05, whose cells are not fine-tuned yet.
  logs = []
  drop_cfg = config.replace(drop_modality='lidar')
  rows = le.run_grid(drop_cfg, res, [0.05, 1.0], [0, 1], log=logs.append, **kw)
  # Nothing trains: no pre-training, no fine-tuning; every finished cell is evaluated once.
  assert len(fake_training['pretrain']) == 1
  assert len(fake_training['finetune']) == 4 and len(fake_training['det3d']) == 4
  assert len(fake_drop_eval) == 8
  finished = [(i, 1.0, s) for s in (0, 1) for i in ('scratch', 'pretrained')]
  for cfg, workdir, task in fake_drop_eval:
    assert cfg.finetune.drop_modality == 'lidar' and cfg.finetune.modalities == report.JOINT
    assert cfg.train.num_train_steps == 7  # the cell's own settings
    assert workdir == os.path.join(cfg.train.workdir, 'drop_lidar')
  assert sorted(os.path.basename(c.train.workdir) for c, _, _ in fake_drop_eval) == sorted(
      report.cell_name(*c, task) for c in finished for task in ('bevseg', 'det3d'))
  for task in ('bevseg', 'det3d'):
    for cell in finished:
      wd = os.path.join(res, report.cell_name(*cell, task))
      with open(report.result_path(wd, 'lidar')) as f:
        r = json.load(f)
      with open(report.result_path(wd)) as f:
        trained = json.load(f)
      assert r['drop_modality'] == 'lidar' and r['steps'] == 7
      assert r['wall_s'] == trained['wall_s']  # the training's, so the row reads like any
      headline = 'eval_nds' if task == 'det3d' else 'eval_miou'
      assert r[headline] == pytest.approx(trained[headline] / 2)
    for init in ('scratch', 'pretrained'):
      assert not os.path.exists(os.path.join(res, report.cell_name(init, 0.05, 0, task)))
      assert (f'== {task} {init} fraction 0.05 seed 0: not fine-tuned yet '
              f'({os.path.join(res, report.cell_name(init, 0.05, 0, task))}); '
              'no lidar-drop evaluation') in logs
  assert sum('evaluating without lidar' in s for s in logs) == 8
  # Reports: <out_prefix>[_det3d]_drop_lidar.*, one row per finished cell; the joint ones stay.
  assert len(rows) == 4 and {(r['init'], r['fraction'], r['seed']) for r in rows} == set(
      finished)
  assert {r['nds'] for r in rows} == {r['nds'] / 2 for r in report.collect(res, task='det3d')}
  for prefix in (out + '_drop_lidar', out + '_det3d_drop_lidar'):
    with open(prefix + '.csv') as f:
      table = list(csv.DictReader(f))
    assert [(r['init'], r['fraction'], r['seed']) for r in table] == [
        (i, '1.0', str(s)) for i, _, s in finished]
    assert os.path.getsize(prefix + '.png') > 1000
  md = open(out + '_drop_lidar.md').read()
  assert '# Label efficiency (BEV map segmentation mIoU, %; joint model, lidar removed at ' \
         'eval)' in md
  # scratch 0.5 + {0, .01} halved -> 25.25 %; pre-trained +5 points.
  assert '| 100% | 25.25 +- 0.35 (n=2) | 30.25 +- 0.35 (n=2) | +5.00 | +5.00, +5.00 |' in md
  with open(out + '.csv') as f:
    assert len(list(csv.DictReader(f))) == 2 * 1 * 2  # the joint report still has its cells
  # A second invocation evaluates nothing again and leaves the results as they were.
  paths = [report.result_path(os.path.join(res, report.cell_name(*c, t)), 'lidar')
           for c in finished for t in ('bevseg', 'det3d')]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]
  logs.clear()
  le.run_grid(drop_cfg, res, [0.05, 1.0], [0, 1], log=logs.append, **kw)
  assert len(fake_drop_eval) == 8 and [os.stat(p).st_mtime_ns for p in paths] == mtimes
  assert not any('evaluating without' in s for s in logs)
  # A single-modality grid has no sensor to remove: refused before anything runs.
  with pytest.raises(ConfigError, match='--drop_modality: .*--modalities=camera'):
    le.run_grid(drop_cfg.replace(modalities='camera'), res, [1.0], [0], log=lambda s: None,
                in_process=True)
  assert len(fake_drop_eval) == 8 and len(fake_training['pretrain']) == 1
  assert len(fake_training['finetune']) == 4


def test_augmented_grid_has_its_own_cells_and_reports_but_the_shared_pretraining(
    tmp_path, fake_training, fake_drop_eval):
  """--augment beside the plain grid in one results dir: cells ft-aug_... / det3d-aug_...
  (ablation cells too) restored from the same unaugmented pre-trainings, reports
  <out_prefix>[_det3d]_aug.*; --drop_modality then evaluates the augmented cells, reported as
  <out_prefix>[_det3d]_aug_drop_<sensor>.*."""
  res, out = str(tmp_path / 'res'), str(tmp_path / 'docs' / 'le')
  config = tiny_config(str(tmp_path))
  kw = dict(tasks=('bevseg', 'det3d'), out_prefix=out, log=lambda s: None, in_process=True)
  grid = dict(ablations=('no_mask',), ablation_fractions=(0.05,), **kw)
  le.run_grid(config, res, [1.0], [0], **kw)  # the plain grid first
  assert len(fake_training['finetune']) == 2 and len(fake_training['det3d']) == 2
  aug = config.replace(augment=True)
  rows = le.run_grid(aug, res, [0.05, 1.0], [0], **grid)
  # The plain pre-training is shared (not refused, not re-run); only the ablation's is new,
  # and neither is augmented.
  pre = fake_training['pretrain']
  assert len(pre) == 2 and not any(c.finetune.augment for c in pre)
  assert pre[1].train.workdir == le.pretrain_dir(res, 'no_mask')
  ft, det = fake_training['finetune'][2:], fake_training['det3d'][2:]
  assert len(ft) == 5 and len(det) == 5
  assert {c.finetune.augment for c in ft + det} == {True}
  names = sorted([f'{p}-aug_{i}_f{f:g}_s0' for p in ('ft', 'det3d')
                  for i in ('scratch', 'pretrained') for f in (0.05, 1.0)] +
                 [f'{p}-aug_pretrained-no_mask_f0.05_s0' for p in ('ft', 'det3d')])
  assert sorted(os.path.basename(c.train.workdir) for c in ft + det) == names
  assert {(os.path.basename(c.train.workdir).split('_', 1)[1], c.finetune.init_workdir)
          for c in ft} == {('scratch_f0.05_s0', ''), ('scratch_f1_s0', ''),
                           ('pretrained_f0.05_s0', le.pretrain_dir(res)),
                           ('pretrained_f1_s0', le.pretrain_dir(res)),
                           ('pretrained-no_mask_f0.05_s0', le.pretrain_dir(res, 'no_mask'))}
  assert len(rows) == 5 and {'nds', 'map'} <= set(rows[0])
  for prefix in (out + '_aug', out + '_det3d_aug'):
    with open(prefix + '.csv') as f:
      assert len(list(csv.DictReader(f))) == 5
    assert os.path.getsize(prefix + '.png') > 1000
  assert ('# Label efficiency (BEV map segmentation mIoU, %; fine-tuned with augmentation)'
          in open(out + '_aug.md').read())
  # The plain grid's cells and reports are untouched, and neither grid reads the other's cells.
  for prefix in (out, out + '_det3d'):
    with open(prefix + '.csv') as f:
      assert len(list(csv.DictReader(f))) == 2
  assert len(report.collect(res)) == 2 and len(report.collect(res, augment=True)) == 5
  # Re-running skips every finished cell.
  le.run_grid(aug, res, [0.05, 1.0], [0], **grid)
  assert len(pre) == 2 and len(fake_training['finetune']) == 7
  # Sensor drop on the augmented grid: its cells only, its own reports.
  rows = le.run_grid(aug.replace(drop_modality='lidar'), res, [0.05, 1.0], [0], **grid)
  assert len(pre) == 2 and len(fake_training['finetune']) == 7
  assert sorted(os.path.basename(c.train.workdir) for c, _, _ in fake_drop_eval) == names
  assert {c.finetune.augment for c, _, _ in fake_drop_eval} == {True}
  assert len(rows) == 5
  for prefix in (out + '_aug_drop_lidar', out + '_det3d_aug_drop_lidar'):
    with open(prefix + '.csv') as f:
      assert len(list(csv.DictReader(f))) == 5
  assert ('; joint model, lidar removed at eval, fine-tuned with augmentation)'
          in open(out + '_aug_drop_lidar.md').read())
  assert not os.path.exists(out + '_drop_lidar.csv')


def _results_dir_from_csv(csv_path: str, results_dir: str) -> None:
  """The result.json files that a grid with the rows of `csv_path` leaves in `results_dir`."""
  with open(csv_path) as f:
    for r in csv.DictReader(f):
      wd = os.path.join(results_dir, report.cell_name(r['init'], float(r['fraction']),
                                                      int(r['seed'])))
      os.makedirs(wd)
      result = {'eval_miou': float(r['miou']), 'steps': int(r['steps']),
                'wall_s': float(r['wall_s']), 'train_frames': int(r['train_frames']),
                **{f'eval_iou/{c}': float(r[c]) for c in MAP_CLASSES}}
      with open(os.path.join(wd, 'result.json'), 'w') as g:
        json.dump(result, g)


def test_report_alone_reproduces_the_committed_cpu_report(tmp_path):
  """The report module on a results dir rewrites docs/label_efficiency_cpu.{csv,md} exactly:
  same columns (the schema's map classes), same row order (seed-major, scratch first), same
  number formats and table."""
  docs = os.path.join(_REPO, 'docs', 'label_efficiency_cpu')
  res = str(tmp_path / 'res')
  _results_dir_from_csv(docs + '.csv', res)
  os.makedirs(os.path.join(res, 'pretrain'))  # not a cell: ignored
  out = str(tmp_path / 'report')
  report.write_summary(report.collect(res), out)
  assert open(out + '.csv').read() == open(docs + '.csv').read()
  assert open(out + '.md').read() == open(docs + '.md').read()


def test_find_cells_orders_like_the_plan_with_ablations_last(tmp_path):
  cells = le.plan([0.01, 0.1, 1.0], [0, 1], ablations=['no_mask', 'no_bev'],
                  ablation_fractions=(0.05,))
  for cell in reversed(cells):
    os.makedirs(tmp_path / report.cell_name(*cell))
  (tmp_path / 'ft_notes.txt').write_text('not a cell')
  found = report.find_cells(str(tmp_path))
  # Plan order except that ablations sort by name (the plan keeps the --ablations order).
  assert found == cells[:12] + sorted(cells[12:])
  assert ('pretrained:no_bev', 0.05, 1) in found
  assert report.collect(str(tmp_path)) == []  # no result.json: nothing finished


def test_augmented_cells_and_reports_have_their_own_names(tmp_path):
  """-aug after the cell prefix (and its modality), _aug in the report name before a sensor
  drop; the unaugmented names stay as the existing results directories have them."""
  assert report.cell_name('pretrained', 0.1, 0, augment=True) == 'ft-aug_pretrained_f0.1_s0'
  assert report.cell_name('scratch', 0.05, 1, 'det3d', augment=True) == (
      'det3d-aug_scratch_f0.05_s1')
  assert report.cell_name('pretrained', 0.1, 0, 'bevseg', 'camera', augment=True) == (
      'ft-camera-aug_pretrained_f0.1_s0')
  assert report.cell_name('pretrained:no_bev', 0.05, 2, augment=True) == (
      'ft-aug_pretrained-no_bev_f0.05_s2')
  assert report.cell_name('pretrained', 0.1, 0) == 'ft_pretrained_f0.1_s0'
  assert report.cell_name('scratch', 0.05, 2, 'det3d') == 'det3d_scratch_f0.05_s2'
  assert report.cell_name('pretrained', 0.1, 0, 'bevseg', 'camera') == (
      'ft-camera_pretrained_f0.1_s0')
  r = str(tmp_path)
  names = {(task, mods, drop, aug): os.path.basename(
      report.default_out_prefix(r, task, mods, drop, aug))
           for task in report.TASKS for mods, drop in ((report.JOINT, ''), ('camera', ''),
                                                       (report.JOINT, 'lidar'))
           for aug in (False, True)}
  assert names == {
      ('bevseg', report.JOINT, '', False): 'label_efficiency',
      ('bevseg', report.JOINT, '', True): 'label_efficiency_aug',
      ('bevseg', 'camera', '', False): 'label_efficiency_camera',
      ('bevseg', 'camera', '', True): 'label_efficiency_camera_aug',
      ('bevseg', report.JOINT, 'lidar', False): 'label_efficiency_drop_lidar',
      ('bevseg', report.JOINT, 'lidar', True): 'label_efficiency_aug_drop_lidar',
      ('det3d', report.JOINT, '', False): 'label_efficiency_det3d',
      ('det3d', report.JOINT, '', True): 'label_efficiency_det3d_aug',
      ('det3d', 'camera', '', False): 'label_efficiency_det3d_camera',
      ('det3d', 'camera', '', True): 'label_efficiency_det3d_camera_aug',
      ('det3d', report.JOINT, 'lidar', False): 'label_efficiency_det3d_drop_lidar',
      ('det3d', report.JOINT, 'lidar', True): 'label_efficiency_det3d_aug_drop_lidar'}
  # The runner's cell of an augmented grid: -aug name, the shared (ablation) pre-training.
  wd, cfg = le._cell_config(tiny_config(augment=True), r, 'pretrained:no_mask', 0.05, 1,
                            'det3d')
  assert wd == os.path.join(r, 'det3d-aug_pretrained-no_mask_f0.05_s1')
  assert cfg.finetune.init_workdir == le.pretrain_dir(r, 'no_mask') and cfg.finetune.augment
  wd, cfg = le._cell_config(tiny_config(augment=True, modalities='camera'), r, 'pretrained',
                            0.1, 0, 'bevseg')
  assert wd == os.path.join(r, 'ft-camera-aug_pretrained_f0.1_s0')
  assert cfg.finetune.init_workdir == le.pretrain_dir(r)


def test_find_cells_separates_augmented_and_plain_cells(tmp_path):
  """One results dir holding the joint and camera-only grids of both tasks, each with and
  without augmentation: every variant finds exactly its own cells (whose prefixes share a
  start: ft, ft-aug, ft-camera, ft-camera-aug) and reads its own results."""
  cells = le.plan([0.1, 1.0], [0], ablations=['no_bev'], ablation_fractions=(0.05,))
  variants = [(task, mods, aug) for task in report.TASKS for mods in (report.JOINT, 'camera')
              for aug in (False, True)]
  for score, (task, mods, aug) in enumerate(variants):
    spec = report.TASKS[task]
    result = {f'eval_{h}': score / 10 for h, _ in spec.headlines}
    result.update({spec.class_key.format(c): 0.0 for c in spec.classes})
    for cell in cells:
      wd = tmp_path / report.cell_name(*cell, task, mods, aug)
      os.makedirs(wd)
      (wd / 'result.json').write_text(json.dumps(result))
  for score, (task, mods, aug) in enumerate(variants):
    assert report.find_cells(str(tmp_path), task, mods, aug) == cells, (task, mods, aug)
    headline = report.TASKS[task].headlines[0][0]
    rows = report.collect(str(tmp_path), task=task, modalities=mods, augment=aug)
    assert [(r['init'], r['fraction'], r['seed']) for r in rows] == cells
    assert {r[headline] for r in rows} == {score / 10}, (task, mods, aug)


def _row(rows, init, fraction, seed):
  return next(r for r in rows if (r['init'], r['fraction'], r['seed']) == (init, fraction, seed))


def _results_without_frame_counts(tmp_path, data_dir: str) -> str:
  """The committed CPU grid's results dir whose scratch 5% seed 0 cell has no train_frames in
  result.json (finished before the runner stored it) and a config.json for `data_dir`."""
  res = str(tmp_path / 'res')
  _results_dir_from_csv(os.path.join(_REPO, 'docs', 'label_efficiency_cpu.csv'), res)
  wd = os.path.join(res, report.cell_name('scratch', 0.05, 0))
  with open(os.path.join(wd, 'result.json')) as f:
    result = json.load(f)
  del result['train_frames']
  with open(os.path.join(wd, 'result.json'), 'w') as f:
    json.dump(result, f)
  config = tiny_config(str(tmp_path), data_dir=data_dir, label_fraction=0.05)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  return res


def test_report_without_frame_count_or_dataset_leaves_it_blank(tmp_path):
  res = _results_without_frame_counts(tmp_path, str(tmp_path / 'no_data'))
  rows = report.collect(res)
  assert _row(rows, 'scratch', 0.05, 0)['train_frames'] == ''
  assert _row(rows, 'pretrained', 0.05, 0)['train_frames'] == 6  # stored: still used
  os.remove(os.path.join(res, report.cell_name('scratch', 0.05, 0), 'config.json'))
  assert _row(report.collect(res), 'scratch', 0.05, 0)['train_frames'] == ''


def test_report_counts_labelled_frames_with_the_pipelines_formula(tmp_path, converted_data_dir):
  """Without a stored count the report counts the cell's dataset: the tiny world has 2 train
  scenes x 4 key frames, and the pipeline keeps max(1, round(f N)) of them."""
  config = tiny_config(data_dir=converted_data_dir)
  assert [report.train_frames(config, f) for f in (0.05, 0.3, 0.5, 1.0)] == [1, 2, 4, 8]
  res = _results_without_frame_counts(tmp_path, converted_data_dir)
  assert _row(report.collect(res), 'scratch', 0.05, 0)['train_frames'] == 1


@pytest.mark.slow
def test_report_command_line_rewrites_the_report(tmp_path):
  docs_csv = os.path.join(_REPO, 'docs', 'label_efficiency_cpu.csv')
  res = str(tmp_path / 'res')
  _results_dir_from_csv(docs_csv, res)
  subprocess.run([sys.executable, '-m', 'experiments.label_efficiency_report',
                  f'--results_dir={res}'], check=True, cwd=_REPO, capture_output=True)
  assert open(os.path.join(res, 'label_efficiency.csv')).read() == open(docs_csv).read()
  assert os.path.getsize(os.path.join(res, 'label_efficiency.png')) > 1000
  bad = subprocess.run([sys.executable, '-m', 'experiments.label_efficiency_report',
                        f'--results_dir={tmp_path / "missing"}'], cwd=_REPO,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and 'does not exist' in bad.stderr
  # A sensor drop exists only for the joint grid: refused before anything is written.
  bad = subprocess.run([sys.executable, '-m', 'experiments.label_efficiency_report',
                        f'--results_dir={res}', '--modalities=camera', '--drop_modality=lidar',
                        f'--out_prefix={tmp_path / "drop"}'], cwd=_REPO, capture_output=True,
                       text=True)
  assert bad.returncode != 0 and '--drop_modality=lidar' in bad.stderr, bad.stderr
  assert not os.path.exists(tmp_path / 'drop.csv')


def test_a_stopped_job_is_not_marked_done_and_the_rerun_resumes_it(tmp_path, fake_training,
                                                                  monkeypatch):
  """A job stopped by SIGTERM (the loop's 'preempted_at_step') is not finished: the grid stops
  naming it, writes no done.json / result.json, and the same command runs it again."""
  import experiments.finetune_bevseg as ft  # pylint: disable=import-outside-toplevel
  import nsmae_jax.train as train  # pylint: disable=import-outside-toplevel
  from nsmae_jax.finetune.task import save_result  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(tmp_path))
  res = str(tmp_path / 'res')
  kw = dict(inits=('pretrained',), log=lambda s: None, in_process=True)
  real_pretrain, real_finetune = train.train_and_evaluate, ft.finetune
  monkeypatch.setattr(train, 'train_and_evaluate', lambda c, wd, task: train.TrainResult(
      state=None, metrics={'loss': 1.0, 'preempted_at_step': 3}))
  with pytest.raises(le.JobStopped, match=r'pretrain was stopped at step 3'):
    le.run_grid(config, res, [1.0], [0], **kw)
  assert not os.path.exists(os.path.join(le.pretrain_dir(res), 'done.json'))
  monkeypatch.setattr(train, 'train_and_evaluate', real_pretrain)

  def stopped_finetune(cfg, workdir):  # as finetune_bevseg.finetune after a SIGTERM
    result = {'eval_miou': 0.1, 'preempted_at_step': 5}
    os.makedirs(workdir, exist_ok=True)
    save_result(cfg, workdir, result)
    return result

  monkeypatch.setattr(ft, 'finetune', stopped_finetune)
  cell = os.path.join(res, report.cell_name('pretrained', 1.0, 0))
  with pytest.raises(le.JobStopped, match=r'stopped at step 5'):
    le.run_grid(config, res, [1.0], [0], **kw)
  assert len(fake_training['pretrain']) == 1  # the resumed pre-training ran to its end
  assert not os.path.exists(os.path.join(cell, 'result.json'))
  monkeypatch.setattr(ft, 'finetune', real_finetune)
  rows = le.run_grid(config, res, [1.0], [0], **kw)
  assert len(rows) == 1 and len(fake_training['finetune']) == 1
  assert os.path.exists(os.path.join(cell, 'result.json'))
