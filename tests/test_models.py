"""The whole pre-training model: gradients reach every parameter group, one compilation per
config, the backbone interface, eval metrics and full-view renders."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from nsmae_jax import models, pretrain
from nsmae_jax.pretrain import losses
from nsmae_jax.config import ConfigError
from nsmae_jax.data.fake import fake_batch

# Smaller than tiny_config's default widths: compile time, not run time, dominates here.
SMALL = dict(vit_width=32, vit_depth=1, vit_heads=2, pillar_features=16, bev_channels=16,
             volume_channels=8, max_points=1024, perspective_rays=32, bev_rays=16,
             num_samples=8, field_width=16)


@pytest.fixture(scope='module')
def setup():
  config = tiny_config(**SMALL)
  task = pretrain.pretrain_task(config)
  batch = jax.tree.map(jnp.asarray, fake_batch(config, 1))
  # Jitted: an eager init dispatches (and compiles) every op on its own, minutes on 2 cores.
  params = jax.jit(task.init_params)(jax.random.key(0), batch)
  return config, task.model, batch, params


def test_params_tree_has_the_backbone_subtree_and_groups(setup):
  _, _, _, params = setup
  assert set(params) == {'backbone', 'field'}
  assert set(params['backbone']) == {'lidar', 'camera', 'lifting', 'fusion'}
  groups = pretrain.param_groups(params)
  assert set(groups) == {'lidar', 'camera', 'lifting', 'fusion', 'field'}


def test_every_group_gets_gradient_and_the_step_compiles_once(setup):
  _, model, batch, params = setup

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch, rng):
    return jax.value_and_grad(lambda p: losses.pretrain_loss(model, p, batch, rng),
                              has_aux=True)(params)

  (loss, aux), grads = step(params, batch, jax.random.key(0))
  other = jax.tree.map(jnp.asarray, fake_batch(setup[0], 1, seed=5))
  (loss2, _), _ = step(params, other, jax.random.key(1))   # new values, same trace
  assert np.isfinite(loss) and np.isfinite(loss2) and loss != loss2
  for name in ('loss', 'perspective_color_loss', 'perspective_depth_loss', 'bev_color_loss',
               'bev_depth_loss', 'perspective_psnr', 'bev_psnr', 'depth_abs_rel'):
    assert np.isfinite(aux['metrics'][name]), name
  for name, tree in pretrain.param_groups(grads).items():
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    assert norm > 0 and np.isfinite(norm), name


def test_backbone_interface_shapes(setup):
  config, _, batch, params = setup
  backbone = models.NSMAEBackbone(config)
  # Shapes only (no compilation): the pre-trained 'backbone' subtree applies on its own.
  feats = jax.eval_shape(lambda p, b: backbone.apply({'params': p}, b, train=False, mask=False),
                         params['backbone'], batch)
  x, y, z = config.volume_shape
  size = models.resolve_size(config)
  assert feats['bev'].shape == (1, x, y, size.bev_channels)
  assert feats['volume'].shape == (1, x, y, z, size.volume_channels)


def test_render_views_shapes_and_targets(setup):
  config, model, batch, params = setup
  views = losses.render_views(model, params, batch, jax.random.key(0), camera=0,
                              max_rays_per_chunk=1024)
  h, w = config.data.image_height, config.data.image_width
  x, y, _ = config.volume_shape
  assert views['perspective_color'].shape == (h, w, 3)
  assert views['perspective_depth_target'].shape == (h, w)
  assert views['bev_color'].shape == (x, y, 3) and views['bev_depth_target'].shape == (x, y)
  np.testing.assert_array_equal(views['perspective_color_target'],
                                np.asarray(batch['images'][0, 0]))
  d = views['perspective_depth_target']
  assert (d == 0).any() and (d > 0).any()
  for v in views.values():
    assert np.all(np.isfinite(v))


def test_unknown_model_size_names_the_flag():
  with pytest.raises(ConfigError, match='--model_size'):
    pretrain.build_pretrain_model(tiny_config(model_size='huge'))


@pytest.mark.parametrize('size', sorted(models.MODEL_SIZES))
def test_named_sizes_build(size):
  config = tiny_config(model_size=size)
  init = pretrain.pretrain_task(config).init_params
  batch = jax.tree.map(jnp.asarray, fake_batch(config, 1))
  shapes = jax.eval_shape(init, jax.random.key(0), batch)
  count = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert count > (1e6 if size == 'demo' else 50e6)
