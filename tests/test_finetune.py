"""Fine-tuning: backbone restored from a pre-training checkpoint, fresh head, scratch loads
nothing; the segmentation loss against closed forms; one loop run end to end."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from helpers import random_params, tiny_config
from nsmae_jax.data.fake import FakeIterator, fake_batch
from nsmae_jax.finetune import bevseg_task, init_from_pretrained, seg_loss
from nsmae_jax.finetune.task import _leaves
from nsmae_jax.train.checkpointing import Checkpointer


@pytest.fixture(scope='module')
def fresh_params():
  """The task's params tree (shapes, dtypes) drawn N(0, 0.1^2): restoring moves leaves whatever
  their values, and compiling the init would take 10-15 s on 2 cores."""
  config = tiny_config()
  task = bevseg_task(config)
  return random_params(task.init_params, jax.random.PRNGKey(0), fake_batch(config, 1))


def _save_pretrain_checkpoint(workdir, backbone, step=7):
  """A pre-training-shaped checkpoint: state {'step', 'params': {'backbone', 'field'}}."""
  field = {'out': {'kernel': np.ones((4, 4), np.float32)}}
  state = {'step': np.int32(step), 'params': {'backbone': backbone, 'field': field}}
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, state, {'next_batch': 3}, force=True)
  ckpt.close()


def test_loaded_leaves_equal_the_checkpoint_and_head_stays_fresh(fresh_params, tmp_path):
  rng = np.random.default_rng(0)
  saved = jax.tree_util.tree_map(
      lambda a: (a + rng.normal(size=a.shape)).astype(a.dtype), fresh_params['backbone'])
  _save_pretrain_checkpoint(tmp_path / 'pre', saved)
  params, report = init_from_pretrained(fresh_params, str(tmp_path / 'pre'))
  assert report['step'] == 7
  backbone_paths = [p for p, _ in _leaves(fresh_params) if p.startswith('backbone/')]
  head_paths = [p for p, _ in _leaves(fresh_params) if p.startswith('head/')]
  assert report['loaded'] == backbone_paths and len(backbone_paths) > 10
  assert report['fresh'] == head_paths and head_paths
  assert report['loaded_params'] == sum(np.size(a) for a in jax.tree_util.tree_leaves(saved))
  for (p1, got), (p2, want) in zip(_leaves(params['backbone']), _leaves(saved)):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=p1)
  for (p1, got), (_, want) in zip(_leaves(params['head']), _leaves(fresh_params['head'])):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=p1)


def test_scratch_loads_nothing(fresh_params, tmp_path):
  config = tiny_config(init_workdir='')
  task = bevseg_task(config, str(tmp_path / 'ft'))
  params = task.prepare_params(fresh_params)
  for (p1, got), (_, want) in zip(_leaves(params), _leaves(fresh_params)):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=p1)
  with open(tmp_path / 'ft' / 'init_report.json') as f:
    report = json.load(f)
  assert report['loaded'] == [] and report['step'] is None
  assert len(report['fresh']) == len(jax.tree_util.tree_leaves(fresh_params))


def test_prepare_params_restores_through_the_task(fresh_params, tmp_path):
  saved = jax.tree_util.tree_map(lambda a: a * 0 + 0.5, fresh_params['backbone'])
  _save_pretrain_checkpoint(tmp_path / 'pre', saved, step=3)
  config = tiny_config(init_workdir=str(tmp_path / 'pre'))
  params = bevseg_task(config, str(tmp_path / 'ft')).prepare_params(fresh_params)
  assert all(np.all(np.asarray(a) == 0.5) for a in jax.tree_util.tree_leaves(params['backbone']))
  with open(tmp_path / 'ft' / 'init_report.json') as f:
    assert json.load(f)['step'] == 3


def test_mismatched_checkpoint_names_the_leaf(fresh_params, tmp_path):
  bad = jax.tree_util.tree_map(np.asarray, fresh_params['backbone'])
  bad = dict(bad, fusion=dict(bad['fusion'], bev_conv=dict(
      bad['fusion']['bev_conv'], volume_kernel=np.zeros((1, 1, 1, 1), np.float32))))
  _save_pretrain_checkpoint(tmp_path / 'pre', bad)
  with pytest.raises(ValueError, match='bev_conv/volume_kernel'):
    init_from_pretrained(fresh_params, str(tmp_path / 'pre'))
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    init_from_pretrained(fresh_params, str(tmp_path / 'empty'))


def test_seg_loss_matches_closed_forms():
  logits = np.array([[2.0, -1.0], [0.5, -3.0]], np.float32)  # [cells, classes]
  labels = np.array([[1, 0], [0, 1]], np.float32)
  p = 1 / (1 + np.exp(-logits))
  ce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  pt = np.where(labels > 0, p, 1 - p)
  np.testing.assert_allclose(seg_loss(logits, labels, 'bce'), ce.mean(0).sum(), rtol=1e-5)
  np.testing.assert_allclose(seg_loss(logits, labels, 'focal'),
                             (ce * (1 - pt) ** 2).mean(0).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match='--seg_loss'):
    seg_loss(logits, labels, 'dice')


@pytest.mark.slow  # compiles an optimizer step of the whole model (fast tier: < 2 min)
@pytest.mark.parametrize('scale', [0.0, 0.25])
def test_backbone_lr_scale_scales_only_backbone_updates(fresh_params, scale):
  """--backbone_lr_scale multiplies the backbone's AdamW update (weight decay included); the
  head's update is the plain one; 0 leaves the backbone exactly as loaded."""
  from nsmae_jax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  config = tiny_config(learning_rate=1e-2, warmup_steps=0, num_train_steps=10)
  task = bevseg_task(config.replace(backbone_lr_scale=scale))
  assert bevseg_task(config).lr_scales is None  # the default adds nothing to the optimiser
  params = jax.tree_util.tree_map(np.asarray, fresh_params)
  grads = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.3), params)

  def first_update(tx):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  plain = first_update(make_optimizer(config.train))
  scaled = first_update(make_optimizer(config.train, task.lr_scales))
  for path, leaf in _leaves(scaled):
    ref = dict(_leaves(plain))[path]
    want = ref * (scale if path.startswith('backbone/') else 1.0)
    np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=0, err_msg=path)
  assert any(np.any(u != 0) for p, u in _leaves(scaled) if p.startswith('head/'))
  if scale == 0.0:
    assert all(np.all(u == 0) for p, u in _leaves(scaled) if p.startswith('backbone/'))


def test_negative_backbone_lr_scale_names_the_flag():
  from nsmae_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match='--backbone_lr_scale'):
    tiny_config().replace(backbone_lr_scale=-0.1).validate()


@pytest.mark.parametrize('augment', [False, True])
def test_augment_flag_reaches_the_training_pipeline_of_both_tasks(augment):
  """--augment hands the loop's make_train_iterator call an Augmentation for segmentation and
  detection alike (never for evaluation, which takes no such argument)."""
  import inspect  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data import augment as augment_lib  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from nsmae_jax.finetune.det3d import det3d_task  # pylint: disable=import-outside-toplevel
  config = tiny_config().replace(augment=augment, label_fraction=0.5)
  for task in (bevseg_task(config), det3d_task(config)):
    kwargs = task.train_data_kwargs
    inspect.signature(pipeline.make_train_iterator).bind(config, **kwargs)  # as the loop calls
    assert kwargs['label_fraction'] == 0.5
    if augment:
      assert kwargs['augmentation'] == augment_lib.Augmentation(), task.name
    else:
      assert kwargs['augmentation'] is None, task.name
  assert 'augmentation' not in inspect.signature(pipeline.make_eval_iterator).parameters


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finetune_loop_end_to_end(tmp_path):
  from nsmae_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(tmp_path), num_train_steps=2, image_every_steps=2,
                       checkpoint_every_steps=2, eval_batches=0)
  devices = jax.local_device_count()

  def eval_batches():
    for k in range(2):
      b = FakeIterator(config, devices, seed=50 + k).__next__()
      b['valid'] = np.array([[True]] * devices) if k == 0 else np.array([[True]] + [[False]] * (
          devices - 1))
      yield b

  workdir = config.train.workdir
  _, result = train_and_evaluate(config, workdir, bevseg_task(config, workdir),
                                 train_iterator=FakeIterator(config, devices),
                                 eval_batches_fn=eval_batches)
  assert 0.0 <= result['eval_miou'] <= 1.0
  assert result['eval_examples'] == devices + 1  # padding slots are not counted
  assert os.path.exists(os.path.join(workdir, 'images', 'bev_pred_vs_gt_000002.png'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(ln) for ln in f]
  assert any('eval_miou' in ln for ln in lines) and any('seg_loss' in ln for ln in lines)
