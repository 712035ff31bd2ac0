"""Single-modality fine-tuning (--modalities) and sensor-drop evaluation (--drop_modality).

A camera-only model never reads points and a LiDAR-only one never reads images: their batches
here lack those arrays altogether. Their backbone trees are the joint tree minus the absent
branch, restored leaf for leaf from a joint pre-training checkpoint. A joint model evaluates with
a sensor removed.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params, tiny_config
from nsmae_jax.config import ConfigError
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.finetune import bevseg_task, seg_loss
from nsmae_jax.finetune.head import BEVSegModel
from nsmae_jax.finetune.task import _leaves, eval_inputs, evaluate_checkpoint
from nsmae_jax.models.backbone import NSMAEBackbone, drop_modality
from nsmae_jax.models.fusion import Conv3x3x3, SplitInputConv
from nsmae_jax.train.checkpointing import Checkpointer

# Small enough that compiling dominates: 16 x 16 x 4 volume, 32 x 32 BEV target.
SMALL = dict(vit_width=16, vit_depth=1, vit_heads=2, pillar_features=8, bev_channels=8,
             volume_channels=4, max_points=512, bev_half_extent=16.0, bev_resolution=1.0,
             seg_head_channels=4)
# The batch arrays only one sensor produces.
SENSOR_KEYS = {'camera': ('images', 'intrinsics', 'cam2lidar'), 'lidar': ('points', 'points_mask')}
OTHER = {'camera': 'lidar', 'lidar': 'camera'}


def _config(**kw):
  return tiny_config(**SMALL, **kw)


def _batch(config, without=()):
  batch = fake_batch(config, 1)
  return {k: jnp.asarray(v) for k, v in batch.items() if k not in without}


def _init_and_apply(config, batch):
  """(params, logits) of a fresh BEVSegModel: one compiled init that also runs the forward."""
  model = BEVSegModel(config)
  init = jax.jit(lambda rng, b: model.init_with_output({'params': rng}, b))
  logits, variables = init(jax.random.PRNGKey(0), batch)
  return jax.tree_util.tree_map(np.asarray, variables['params']), np.asarray(logits)


def _random_params(config, batch, seed=0):
  """Params of config's BEVSegModel drawn N(0, 0.1^2) without compiling an init."""
  model = BEVSegModel(config)
  return random_params(lambda b: model.init({'params': jax.random.PRNGKey(0)}, b)['params'],
                       batch, seed=seed)


@pytest.fixture(scope='module')
def models():
  """{modalities: (config, params, logits)}: single-modality models initialised and applied on
  batches without the other sensor's arrays; the joint one random (logits None)."""
  joint = _config()
  out = {'camera,lidar': (joint, _random_params(joint, _batch(joint)), None)}
  for mods in ('camera', 'lidar'):
    config = _config(modalities=mods)
    out[mods] = (config, *_init_and_apply(config, _batch(config,
                                                          without=SENSOR_KEYS[OTHER[mods]])))
  return out


@pytest.mark.slow  # the models fixture compiles three models (fast tier: < 2 min)
@pytest.mark.parametrize('present', ['camera', 'lidar'])
def test_single_modality_model_needs_no_input_of_the_other_sensor(models, present):
  config, params, logits = models[present]
  assert logits.shape == (1, config.data.bev_cells, config.data.bev_cells, 6)
  assert np.all(np.isfinite(logits))
  want = {'camera': {'camera', 'lifting', 'fusion'}, 'lidar': {'lidar', 'fusion'}}[present]
  assert set(params['backbone']) == want
  fusion = params['backbone']['fusion']
  assert ('height_lift' in fusion) == (present == 'lidar')
  assert set(fusion['fuse0']) == {f'{present}_kernel', 'bias'}


@pytest.mark.slow  # the models fixture (fast tier: < 2 min)
@pytest.mark.parametrize('present', ['camera', 'lidar'])
def test_single_modality_tree_is_the_joint_tree_minus_the_absent_branch(models, present):
  joint = dict(_leaves(models['camera,lidar'][1]['backbone']))
  single = dict(_leaves(models[present][1]['backbone']))
  for path, leaf in single.items():
    assert path in joint and joint[path].shape == leaf.shape, path
  absent = OTHER[present]
  owners = {'lidar': ('lidar/', 'fusion/height_lift/', 'fusion/fuse0/lidar_kernel',
                      'fusion/bev_conv/lidar_kernel'),
            'camera': ('camera/', 'lifting/', 'fusion/fuse0/camera_kernel')}[absent]
  extra = set(joint) - set(single)
  assert extra and all(p.startswith(owners) for p in extra), sorted(extra)
  assert all(any(p.startswith(o) for p in extra) for o in owners)


def _save_checkpoint(workdir, params, step):
  """A checkpoint shaped like the loop's: state {'step', 'params'}."""
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, {'step': np.int32(step), 'params': params}, {'next_batch': 0}, force=True)
  ckpt.close()


@pytest.mark.slow  # the models fixture (fast tier: < 2 min)
@pytest.mark.parametrize('present', ['camera', 'lidar'])
def test_present_branch_restores_equal_to_the_joint_checkpoint(models, present, tmp_path):
  rng = np.random.default_rng(1)
  joint = jax.tree_util.tree_map(lambda a: (a + rng.normal(size=a.shape)).astype(a.dtype),
                                 models['camera,lidar'][1]['backbone'])
  field = {'out': {'kernel': np.ones((4, 4), np.float32)}}  # pre-training's other subtrees
  _save_checkpoint(tmp_path / 'pre', {'backbone': joint, 'field': field}, step=5)
  config, fresh, _ = models[present]
  config = config.replace(init_workdir=str(tmp_path / 'pre'))
  params = bevseg_task(config, str(tmp_path / 'ft')).prepare_params(fresh)
  saved = dict(_leaves(joint))
  for path, leaf in _leaves(params['backbone']):
    np.testing.assert_array_equal(np.asarray(leaf), saved[path], err_msg=path)
  for (path, got), (_, want) in zip(_leaves(params['head']), _leaves(fresh['head'])):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
  with open(tmp_path / 'ft' / 'init_report.json') as f:
    report = json.load(f)
  assert report['modalities'] == [present] and report['step'] == 5
  assert report['loaded'] == ['backbone/' + p for p, _ in _leaves(fresh['backbone'])]


@pytest.mark.slow  # compiles the joint model twice (jit and a pmap over 2 devices)
def test_drop_modality_eval_of_the_joint_model(models, tmp_path):
  """evaluate_checkpoint with --drop_modality=lidar scores the joint fine-tuned params on the
  batch without points: the same loss as the model applied to drop_modality(batch), and not the
  loss with points."""
  config, params, _ = models['camera,lidar']
  _save_checkpoint(tmp_path / 'ft', params, step=3)
  batch = _batch(config)
  model = BEVSegModel(config)
  labels = jnp.moveaxis(batch['bev_map'], -3, -1)
  loss = jax.jit(lambda b: seg_loss(model.apply({'params': params}, b), labels))
  want, full = float(loss(drop_modality(batch, 'lidar'))), float(loss(batch))
  assert abs(want - full) > 1e-6 * abs(full)
  dropped = config.replace(drop_modality='lidar')
  host = {k: np.repeat(np.asarray(v)[None], jax.local_device_count(), 0)
          for k, v in batch.items()}
  summary = evaluate_checkpoint(dropped, str(tmp_path / 'ft'), bevseg_task(dropped),
                                eval_batches_fn=lambda: [host])
  np.testing.assert_allclose(summary['seg_loss'], want, rtol=1e-5)
  assert summary['examples'] == jax.local_device_count()


def test_drop_modality_empties_only_that_sensor():
  config = _config()
  batch = _batch(config)
  no_cam = eval_inputs(config.replace(drop_modality='camera'))(batch)
  assert not np.any(no_cam['images']) and np.any(batch['images'])
  np.testing.assert_array_equal(no_cam['points'], batch['points'])
  np.testing.assert_array_equal(no_cam['cam2lidar'], batch['cam2lidar'])
  no_lidar = eval_inputs(config.replace(drop_modality='lidar'))(batch)
  assert not np.any(no_lidar['points_mask']) and np.any(batch['points_mask'])
  np.testing.assert_array_equal(no_lidar['images'], batch['images'])
  assert eval_inputs(config)(batch) is batch


def test_bad_modality_settings_name_the_flag():
  with pytest.raises(ConfigError, match='--modalities'):
    _config(modalities='lidar,camera').validate()
  with pytest.raises(ConfigError, match='--drop_modality'):
    _config(drop_modality='radar').validate()
  # A single-modality model has no second sensor to drop.
  with pytest.raises(ConfigError, match='--drop_modality'):
    eval_inputs(_config(modalities='camera', drop_modality='lidar'))
  # Pre-training (MAE masking) stays joint: a camera-only backbone refuses to mask.
  config = _config(modalities='camera')
  backbone = NSMAEBackbone(config)
  with pytest.raises(ConfigError, match='--modalities: pre-training is joint'):
    jax.eval_shape(lambda b: backbone.init({'params': jax.random.PRNGKey(0),
                                            'mask': jax.random.PRNGKey(1)}, b, mask=True),
                   _batch(config, without=SENSOR_KEYS['lidar']))


@pytest.mark.slow  # compiles both convolutions eagerly (fast tier: < 2 min)
def test_split_input_conv_is_the_convolution_of_the_concatenation():
  """The joint fusion layers compute exactly one convolution over the concatenated inputs."""
  rng = np.random.default_rng(0)
  xs = {'a': rng.normal(size=(1, 4, 5, 3, 2)).astype(np.float32),
        'b': rng.normal(size=(1, 4, 5, 3, 3)).astype(np.float32)}
  layer = SplitInputConv(6, ndim=3)
  p = layer.init(jax.random.PRNGKey(0), xs)['params']
  got = layer.apply({'params': p}, xs)
  whole = {'kernel': np.concatenate([p['a_kernel'], p['b_kernel']], axis=-2), 'bias': p['bias']}
  cat = np.concatenate([xs['a'], xs['b']], axis=-1)
  np.testing.assert_allclose(got, Conv3x3x3(6).apply({'params': whole}, cat), rtol=1e-5,
                             atol=1e-5)
  xs2 = {k: v[..., 0, :] for k, v in xs.items()}
  layer2 = SplitInputConv(6, ndim=2)
  p2 = layer2.init(jax.random.PRNGKey(1), xs2)['params']
  whole2 = {'kernel': np.concatenate([p2['a_kernel'], p2['b_kernel']], axis=-2),
            'bias': p2['bias']}
  ref = nn.Conv(6, (3, 3)).apply({'params': whole2}, cat[..., 0, :])
  np.testing.assert_allclose(layer2.apply({'params': p2}, xs2), ref, rtol=1e-5, atol=1e-5)
