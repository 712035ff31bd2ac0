"""Targets and loss terms: depth targets are the LiDAR ranges, terms switch off by weight."""

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from nsmae_jax.pretrain import losses, targets
from nsmae_jax.data.fake import fake_batch


def _example(config):
  b = fake_batch(config, 1)
  return [jnp.asarray(b[k][0]) for k in ('images', 'intrinsics', 'cam2lidar', 'points',
                                          'points_mask')]


def test_perspective_lidar_rays_pass_through_their_points():
  config = tiny_config()
  images, intr, c2l, pts, pmask = _example(config)
  tg = jax.jit(lambda k: targets.perspective_targets(k, images, intr, c2l, pts, pmask, 64, 32,
                                                     *config.volume_bounds))(jax.random.key(0))
  o, d, depth = (np.asarray(tg[k]) for k in ('origins', 'dirs', 'depth'))
  valid = np.asarray(tg['depth_valid'])
  assert valid[:64].all() and not valid[64:].any()
  hit = o[:64] + depth[:64, None] * d[:64]
  # Each hit point is one of the valid LiDAR points.
  p = np.asarray(pts)[np.asarray(pmask)][:, :3]
  dist = np.min(np.linalg.norm(hit[:, None] - p[None], axis=-1), axis=1)
  assert dist.max() < 1e-3
  assert np.asarray(tg['color_valid']).all()


def test_bev_targets_take_the_highest_return_per_cell():
  config = tiny_config()
  images, intr, c2l, pts, pmask = _example(config)
  box_min, box_max = config.volume_bounds
  grid = config.volume_shape[:2]
  cells = jax.jit(lambda *a: targets.bev_cell_targets(*a, grid, box_min, box_max))(
      images, intr, c2l, pts, pmask)
  p = np.asarray(pts)[np.asarray(pmask)][:, :3]
  cell = (box_max[0] - box_min[0]) / grid[0]
  ij = np.floor((p[:, :2] - np.array(box_min[:2])) / cell).astype(int)
  top = np.full(grid, -np.inf)
  np.maximum.at(top, (ij[:, 0], ij[:, 1]), p[:, 2])
  expected = np.where(np.isfinite(top), box_max[2] - top, 0.0).reshape(-1)
  np.testing.assert_allclose(np.asarray(cells['depth']), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cells['depth_valid']), np.isfinite(top).reshape(-1))


def test_view_terms_mask_and_zero_weights_switch_terms_off():
  out = dict(color=jnp.array([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]),
             color_target=jnp.array([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]),
             color_valid=jnp.array([True, False]), depth=jnp.array([2.0, 5.0]),
             depth_target=jnp.array([4.0, 1.0]), depth_valid=jnp.array([True, False]))
  terms = losses.view_terms(out)
  np.testing.assert_allclose(terms['color_loss'], 0.0)
  np.testing.assert_allclose(terms['depth_loss'], 2.0)
  np.testing.assert_allclose(terms['depth_abs_rel'], 0.5)


def test_loss_weights_select_and_scale_the_terms():
  view = lambda c, d: dict(color=jnp.full((1, 2, 3), c), color_target=jnp.zeros((1, 2, 3)),
                           color_valid=jnp.ones((1, 2), bool), depth=jnp.full((1, 2), d),
                           depth_target=jnp.ones((1, 2)), depth_valid=jnp.ones((1, 2), bool))
  out = {'perspective': view(0.1, 3.0), 'bev': view(0.2, 5.0)}
  # color losses 0.01, 0.04; depth losses 2, 4.
  config = tiny_config(perspective_color_weight=0.0, perspective_depth_weight=0.5,
                       bev_color_weight=2.0, bev_depth_weight=0.0)
  loss, m = losses.weighted_loss(config, out)
  np.testing.assert_allclose(loss, 0.5 * 2.0 + 2.0 * 0.04, rtol=1e-6)
  np.testing.assert_allclose([m['perspective_color_loss'], m['bev_depth_loss']], [0.01, 4.0],
                             rtol=1e-6)  # switched-off terms are still reported
  np.testing.assert_allclose(m['perspective_psnr'], 20.0, rtol=1e-6)
  np.testing.assert_allclose(m['depth_abs_rel'], 2.0, rtol=1e-6)
  # A view without rays (bev_rays=0) contributes nothing and reports zeros.
  config = tiny_config(bev_rays=0)
  loss, m = losses.weighted_loss(config, {'perspective': out['perspective']})
  np.testing.assert_allclose(loss, 0.01 + 0.1 * 2.0, rtol=1e-6)
  assert m['bev_color_loss'] == 0
