"""Detection fine-tuning: the demo flagfile, and a tiny run through train_and_evaluate that
scores its detections with the devkit. (The backbone restore is nsmae_jax.finetune.task's
init_from_pretrained, tested in test_finetune.py; here the run's init report is checked.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import flags as nsflags
from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(det_resolution=2.0, det_head_channels=16)


def test_demo_flagfile_parses_and_bad_detection_values_name_the_flag():
  nsflags.FLAGS.unparse_flags()
  try:
    nsflags.FLAGS(['prog', f'--flagfile={ROOT}/experiments/configs/det3d_demo.flags',
                   '--init_workdir='])
    config = nsflags.config_from_flags()
  finally:
    nsflags.FLAGS.unparse_flags()
  assert config.detection.det_nms == 'circle' and config.train.eval_batches == 0
  from nsmae_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  for bad, flag in ((dict(det_top_k=501), 'det_top_k'), (dict(det_nms='iou'), 'det_nms'),
                    (dict(det_min_overlap=1.0), 'det_min_overlap')):
    with pytest.raises(ConfigError, match=f'--{flag}'):
      config.replace(**bad).validate()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_finetune_reports_devkit_detection_metrics(converted_data_dir, synthetic_dataroot,
                                                        tmp_path):
  from experiments.finetune_det3d import finetune  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(tmp_path), data_dir=converted_data_dir, dataroot=synthetic_dataroot,
                       num_train_steps=2, eval_every_steps=0, eval_batches=0,
                       image_every_steps=2, checkpoint_every_steps=2, **SMALL)
  workdir = config.train.workdir
  result = finetune(config, workdir)
  print({k: round(v, 4) for k, v in result.items() if k in (
      'eval_map', 'eval_nds', 'eval_mate', 'eval_loss', 'loss')})
  for key in ('mate', 'mase', 'maoe', 'mave', 'maae', 'ate_car'):
    assert np.isfinite(result[f'eval_{key}']) and result[f'eval_{key}'] >= 0.0, key
  for key in ('map', 'nds', 'ap_car', 'ap_pedestrian'):
    assert 0.0 <= result[f'eval_{key}'] <= 1.0, key
  assert result['eval_coverage'] == 1.0 and result['eval_examples'] == 4
  with open(os.path.join(workdir, 'det3d', 'results.json')) as f:
    submitted = json.load(f)
  assert len(submitted['results']) == 4  # every val key frame, as the devkit requires
  boxes = [b for entries in submitted['results'].values() for b in entries]
  assert boxes and all(len(b['size']) == 3 and len(b['rotation']) == 4 for b in boxes)
  assert os.path.exists(os.path.join(workdir, 'images', 'det_bev_pred_vs_gt_000002.png'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(ln) for ln in f]
  assert any('eval_nds' in ln for ln in lines) and any('heatmap_loss' in ln for ln in lines)
  with open(os.path.join(workdir, 'init_report.json')) as f:
    report = json.load(f)  # scratch: nothing loaded, backbone and head fresh
  assert report['loaded'] == [] and {p.split('/')[0] for p in report['fresh']} == {
      'backbone', 'head'}
  with open(os.path.join(workdir, 'result.json')) as f:
    assert json.load(f)['eval_map'] == result['eval_map']
