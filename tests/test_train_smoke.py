"""flax-style smoke tests: the whole train_and_evaluate for 2 steps with the real tasks (NS-MAE
pre-training, BEV segmentation from scratch) on a shrunken model and fake batches. No world, no
subprocess: the integration test that catches most breakage between the loop and a task. They
compile two whole train steps (about a minute on 2 cores), so they run in the slow tier:
`pytest tests/test_train_smoke.py` runs them alone."""

from __future__ import annotations

import glob
import json
import os
import struct

import jax
import numpy as np
import pytest

from helpers import tiny_config

from nsmae_jax.data.fake import FakeIterator
from nsmae_jax.finetune import bevseg_task
from nsmae_jax.pretrain import pretrain_task
from nsmae_jax.train import train_and_evaluate
from nsmae_jax.train.checkpointing import Checkpointer
from nsmae_jax.train.integrity import verify_step

# tiny_config made smaller still: narrow encoders, few points and rays (the notebook's CI preset).
SMALL = dict(max_points=1024, max_boxes=8, bev_resolution=1.0, pillar_size=2.0, volume_stride=2,
             volume_z_cells=2, vit_width=32, vit_depth=1, vit_heads=2, pillar_features=16,
             bev_channels=16, volume_channels=8, num_samples=8, perspective_rays=32, bev_rays=16,
             field_width=16, seg_head_channels=16, num_train_steps=2, log_every_steps=1,
             checkpoint_every_steps=2, eval_every_steps=2, eval_batches=1, warmup_steps=1)


def _events(workdir):
  """{tag: [(step, kind)]} of every event file under workdir/tensorboard (TFRecord framing)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  tags = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        kind = 'image' if value.HasField('image') else 'scalar'
        tags.setdefault(value.tag, []).append((event.step, kind))
  return tags


def _run(config, task, capsys):
  devices = jax.local_device_count()
  workdir = config.train.workdir
  state, metrics = train_and_evaluate(
      config, workdir, task, train_iterator=FakeIterator(config, devices),
      eval_batches_fn=lambda: iter([next(FakeIterator(config, devices, seed=7))]))
  captured = capsys.readouterr()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
  assert [r['step'] for r in rows if 'eval_loss' in r] == [0, 2]  # baseline, then periodic
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert int(state.step) == 2 and np.isfinite(metrics['loss'])
  ckpt = Checkpointer(workdir)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  assert verify_step(os.path.join(workdir, 'checkpoints', '2')) is None
  tags = _events(workdir)
  assert [s for s, _ in tags['loss']] == [1, 2] and [s for s, _ in tags['eval_loss']] == [0, 2]
  return rows, tags, captured, metrics


@pytest.mark.slow  # trains: compiles the whole pre-training step (fast tier: < 2 min)
@pytest.mark.timeout(900)
def test_pretrain_task_two_steps(tmp_path, capsys):
  config = tiny_config(str(tmp_path), image_every_steps=0, **SMALL)
  rows, tags, captured, _ = _run(config, pretrain_task(config), capsys)
  for key in ('perspective_color_loss', 'bev_depth_loss', 'grad_norm', 'learning_rate'):
    assert np.isfinite(rows[-1].get(key, rows[-2].get(key))), key
  assert 'perspective_psnr' in tags
  assert 'pretrain:' in captured.err and 'loss=' in captured.err  # the tqdm bar


@pytest.mark.slow  # trains: compiles the whole fine-tuning step (fast tier: < 2 min)
@pytest.mark.timeout(900)
def test_bevseg_task_from_scratch_two_steps(tmp_path, capsys):
  config = tiny_config(str(tmp_path), image_every_steps=2, init_workdir='', **SMALL)
  _, tags, captured, metrics = _run(config, bevseg_task(config, config.train.workdir), capsys)
  assert 0.0 <= metrics['eval_miou'] <= 1.0
  assert ('eval_miou' in tags and tags['bev_pred_vs_gt'] == [(2, 'image')])
  assert os.path.exists(os.path.join(config.train.workdir, 'images', 'bev_pred_vs_gt_000002.png'))
  # The bar carries the task's headline metrics: train loss and eval mIoU.
  assert 'bevseg:' in captured.err and 'loss=' in captured.err and 'eval_miou=' in captured.err
  assert 'eval @ 2:' in captured.out
