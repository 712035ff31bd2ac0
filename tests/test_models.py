"""The whole pre-training model: gradients reach every parameter group and every restored
backbone leaf, one compilation per config, the backbone interface (block masking hides LiDAR
points), eval metrics with and without masking, and full-view renders."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import flat_draw, random_params, tiny_config
from nsmae_jax import models, pretrain
from nsmae_jax.pretrain import losses
from nsmae_jax.config import ConfigError
from nsmae_jax.data.fake import fake_batch

# Smaller than tiny_config's default widths: compile time, not run time, dominates here.
SMALL = dict(vit_width=32, vit_depth=1, vit_heads=2, pillar_features=16, bev_channels=16,
             volume_channels=8, max_points=1024, perspective_rays=32, bev_rays=16,
             num_samples=8, field_width=16)


def _batch(config, seed=0):
  return jax.tree.map(jnp.asarray, fake_batch(config, 1, seed=seed))


@pytest.fixture(scope='module')
def setup():
  """(config, model, batch, params) with params from the model's init (slow: its compilation
  alone takes 15-20 s on 2 cores)."""
  config = tiny_config(**SMALL)
  task = pretrain.pretrain_task(config)
  batch = _batch(config)
  # Jitted: an eager init dispatches (and compiles) every op on its own, minutes on 2 cores.
  params = jax.jit(task.init_params)(jax.random.key(0), batch)
  return config, task.model, batch, params


@pytest.fixture(scope='module')
def random_setup():
  """As setup, but the params are the init's tree (shapes, dtypes) drawn N(0, 0.1^2) without
  compiling the init: for the tests whose claims hold for any weights."""
  config = tiny_config(**SMALL)
  task = pretrain.pretrain_task(config)
  batch = _batch(config)
  params = jax.tree.map(jnp.asarray, random_params(task.init_params, jax.random.key(0), batch))
  return config, task.model, batch, params


def test_params_tree_has_the_backbone_subtree_and_groups(random_setup):
  _, _, _, params = random_setup
  assert set(params) == {'backbone', 'field', 'bev_decoder', 'background'}
  assert set(params['backbone']) == {'lidar', 'camera', 'lifting', 'fusion'}
  groups = pretrain.param_groups(params)
  assert set(groups) == {'lidar', 'camera', 'lifting', 'fusion', 'field', 'bev_decoder'}


@pytest.mark.slow  # compiles the full train step (fast tier: < 2 min)
def test_every_group_gets_gradient_and_the_step_compiles_once(setup):
  _, model, batch, params = setup

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch, rng):
    return jax.value_and_grad(lambda p: losses.pretrain_loss(model, p, batch, rng),
                              has_aux=True)(params)

  (loss, aux), grads = step(params, batch, jax.random.key(0))
  other = _batch(setup[0], seed=5)
  (loss2, _), _ = step(params, other, jax.random.key(1))   # new values, same trace
  assert np.isfinite(loss) and np.isfinite(loss2) and loss != loss2
  for name in ('loss', 'perspective_color_loss', 'perspective_depth_loss', 'bev_color_loss',
               'bev_depth_loss', 'perspective_psnr', 'bev_psnr', 'depth_abs_rel'):
    assert np.isfinite(aux['metrics'][name]), name
  for name, tree in pretrain.param_groups(grads).items():
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    assert norm > 0 and np.isfinite(norm), name
  # Every leaf that fine-tuning restores learns in pre-training, fusion's bev_conv included
  # (the BEV view renders the fused BEV map).
  dead = [jax.tree_util.keystr(path) for path, g in
          jax.tree_util.tree_leaves_with_path(grads['backbone'])
          if not (np.any(np.asarray(g) != 0) and np.all(np.isfinite(g)))]
  assert not dead, dead
  assert 'bev_conv' in grads['backbone']['fusion']


def test_backbone_interface_shapes(random_setup):
  config, _, batch, params = random_setup
  backbone = models.NSMAEBackbone(config)
  # Shapes only (no compilation): the pre-trained 'backbone' subtree applies on its own.
  feats = jax.eval_shape(lambda p, b: backbone.apply({'params': p}, b, train=False, mask=False),
                         params['backbone'], batch)
  x, y, z = config.volume_shape
  size = models.resolve_size(config)
  assert feats['bev'].shape == (1, x, y, size.bev_channels)
  assert feats['volume'].shape == (1, x, y, z, size.volume_channels)
  assert feats['lidar_block_mask'].shape == (1, x, y)
  assert feats['pillar_mask'].shape == (1, config.pillar_cells ** 2)


def test_nothing_of_a_dropped_lidar_block_reaches_the_backbone(random_setup):
  """Moving the points inside dropped blocks (fused-volume cells) leaves every backbone output
  unchanged; moving points of a kept block does not (with any weights: random ones here)."""
  config, model, batch, params = random_setup
  apply = jax.jit(lambda p, b: model.apply({'params': p}, b, mask=True, method=model.encode,
                                           rngs={'mask': jax.random.key(3)}))
  feats = apply(params, batch)
  dropped = np.asarray(feats['lidar_block_mask'])[0]
  assert 0 < dropped.sum() < dropped.size
  pts = np.asarray(batch['points'])[0]
  valid = np.asarray(batch['points_mask'])[0]
  block = config.model.pillar_size * config.model.volume_stride
  ij = np.floor((pts[:, :2] + config.data.bev_half_extent) / block).astype(int)
  in_dropped = valid & dropped[ij[:, 0], ij[:, 1]]
  in_kept = valid & ~dropped[ij[:, 0], ij[:, 1]]
  assert in_dropped.sum() > 0 and in_kept.sum() > 0

  def moved(which):
    p = pts.copy()
    # Same x-y block (so the same blocks are non-empty and the same mask is drawn); new height
    # and intensity.
    p[which, 2] = np.clip(p[which, 2] * 0.5 + 0.3, config.model.z_min, config.model.z_max)
    p[which, 3] = 1.0 - p[which, 3]
    return apply(params, dict(batch, points=jnp.asarray(p)[None]))

  hidden, visible = moved(in_dropped), moved(in_kept)
  np.testing.assert_array_equal(hidden['lidar_block_mask'], feats['lidar_block_mask'])
  for key in ('bev', 'volume'):
    np.testing.assert_array_equal(hidden[key], feats[key], err_msg=key)
  assert not np.allclose(visible['bev'], feats['bev'])


@pytest.mark.slow  # compiles the eval step (fast tier: < 2 min)
def test_eval_reports_unmasked_and_masked_figures(setup):
  _, model, batch, params = setup
  loss, aux = jax.jit(lambda p, b: losses.pretrain_loss(model, p, b, jax.random.key(0),
                                                        train=False))(params, batch)
  m = {k: float(v) for k, v in aux['metrics'].items()}
  plain = {k for k in m if not k.startswith('masked_')}
  assert {'loss', 'perspective_color_loss', 'bev_depth_loss', 'depth_abs_rel'} <= plain
  assert {f'masked_{k}' for k in plain} == set(m) - plain
  assert all(np.isfinite(v) for v in m.values())
  assert float(loss) == m['loss']
  # The masked pass sees less and is scored on hidden targets only: a different figure.
  assert m['masked_perspective_color_loss'] != m['perspective_color_loss']
  assert m['masked_bev_depth_loss'] != m['bev_depth_loss']


@pytest.mark.slow  # compiles the chunked renderer of both views (fast tier: < 2 min)
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


@pytest.mark.parametrize('modalities', ['camera', 'lidar'])
def test_single_modality_pretraining_is_refused_naming_the_flag(modalities):
  with pytest.raises(ConfigError, match=f'--modalities={modalities}'):
    pretrain.pretrain_task(tiny_config(modalities=modalities))


@pytest.mark.parametrize('size', sorted(models.MODEL_SIZES))
def test_named_sizes_build(size):
  config = tiny_config(model_size=size)
  init = pretrain.pretrain_task(config).init_params
  batch = _batch(config)
  shapes = jax.eval_shape(init, jax.random.key(0), batch)
  count = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert count > (1e6 if size == 'demo' else 50e6)


@pytest.mark.parametrize('shape', [(2, 5, 4, 3, 6, 7), (1, 3, 6, 1, 4, 2)])
def test_fusion_conv3x3x3_is_the_3d_convolution(shape):
  """The fusion's 3x3x3 convolution (z-taps on channels + one 2D convolution) equals XLA's
  native 'SAME' 3D convolution, values and gradients (x and kernel), Z = 1 included."""
  from nsmae_jax.models.fusion import _conv3x3x3  # pylint: disable=import-outside-toplevel
  b, nx, ny, nz, cin, cout = shape
  x = flat_draw(jax.random.normal, jax.random.key(0), (b, nx, ny, nz, cin))
  kernel = flat_draw(jax.random.normal, jax.random.key(1), (3, 3, 3, cin, cout))
  native = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1, 1), 'SAME', dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
      precision=jax.lax.Precision.HIGHEST)
  cot = flat_draw(jax.random.normal, jax.random.key(2), (b, nx, ny, nz, cout))
  # One compilation: values and gradients w.r.t. x and the kernel of both implementations.
  both = lambda f, x, k: (f(x, k),) + jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * cot),
                                                          argnums=(0, 1))(x, k)
  (got_y, got_sum, got), (want_y, want_sum, want) = jax.jit(
      lambda x, k: (both(_conv3x3x3, x, k), both(native, x, k)))(x, kernel)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-4)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
