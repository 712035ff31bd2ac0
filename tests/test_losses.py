"""Targets and loss terms: depth targets are the nearest key-frame returns per pixel (z-buffer),
BEV colour only where the top return is visible, hidden targets weighted per --masked_loss,
terms switch off by weight."""

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.geometry import pixel_index, project_points
from nsmae_jax.pretrain import losses, targets

CONFIG = tiny_config()


def _example(config, seed=0):
  b = fake_batch(config, 1, seed=seed)  # half key-frame points (time lag 0), half sweeps
  return {k: jnp.asarray(v[0]) for k, v in b.items()}


@jax.jit
def _bev_cells(example):
  """targets.bev_cell_targets of one example at CONFIG (one compilation for every test)."""
  return targets.bev_cell_targets(*targets._example_args(CONFIG, example),
                                  CONFIG.volume_shape[:2], *CONFIG.volume_bounds)


def _draw(config, example, key=0):
  return jax.jit(lambda k, ex: jax.tree.map(lambda a: a[0], targets.draw_rays(
      config, k, jax.tree.map(lambda a: a[None], ex))))(jax.random.key(key), example)


def test_perspective_lidar_rays_hit_the_nearest_key_frame_return_of_their_pixel():
  config = CONFIG.replace(perspective_rays=128)
  ex = _example(config)
  tg = _draw(config, ex)['perspective']
  o, d, depth = (np.asarray(tg[k]) for k in ('origins', 'dirs', 'depth'))
  valid = np.asarray(tg['depth_valid'])
  assert valid[:64].all() and not valid[64:].any()
  pts = np.asarray(ex['points'])
  key = np.asarray(ex['points_mask']) & (pts[:, 4] == 0)
  hit = o[:64] + depth[:64, None] * d[:64]
  # Each hit point is a key-frame point (never a sweep point) ...
  dist = np.linalg.norm(hit[:, None] - pts[None, :, :3], axis=-1)
  nearest_pt = np.argmin(dist, axis=1)
  assert dist[np.arange(64), nearest_pt].max() < 1e-3 and key[nearest_pt].all()
  # ... and the nearest key-frame return of its pixel in its camera.
  h, w = config.data.image_height, config.data.image_width
  src = np.asarray(tg['image_source'])[:64]

  @jax.jit
  def project(intrinsics, cam2lidar, cam):   # every point into camera `cam`
    uv, _, front = project_points(jnp.asarray(pts[:, :3]), intrinsics[cam], cam2lidar[cam])
    return uv, pixel_index(uv, h, w), front

  for r in range(64):
    cam = src[r, 0]
    uv, rc, front = (np.asarray(a) for a in project(ex['intrinsics'], ex['cam2lidar'], cam))
    inside = (np.asarray(front) & (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5)
              & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5))
    same = key & inside & (rc[:, 0] == src[r, 1]) & (rc[:, 1] == src[r, 2])
    ranges = np.linalg.norm(pts[same, :3] - o[r], axis=-1)
    assert same[nearest_pt[r]] and np.isclose(depth[r], ranges.min(), rtol=1e-5)
  assert np.asarray(tg['color_valid']).all()


def _scene(points, image0=(1.0, 0.0, 0.0)):
  """The fake rig with hand-placed points [N, 5]; camera 0 (FRONT, at (0, 0.5, -0.3), looking
  along +y) sees a uniform image0, the others black."""
  ex = _example(CONFIG)
  n = CONFIG.data.max_points
  pts = np.zeros((n, 5), np.float32)
  pts[:len(points)] = points
  images = np.zeros(ex['images'].shape, np.float32)
  images[0] = image0
  return dict(ex, points=jnp.asarray(pts), points_mask=jnp.asarray(np.arange(n) < len(points)),
              images=jnp.asarray(images))


def test_an_occluded_point_gives_no_perspective_target_and_sweeps_only_on_request():
  # Near and far points on one line of sight of camera 0; a sweep point nearer still.
  near, far, sweep = [0, 5, -0.3, 0, 0], [0, 10, -0.3, 0, 0], [0, 3, -0.3, 0, 0.2]
  ex = _scene([far, near, sweep])
  for lag, expected in ((0.0, 4.5), (0.3, 2.5)):
    tg = _draw(CONFIG.replace(target_time_lag=lag), ex)['perspective']
    valid = np.asarray(tg['depth_valid'])
    assert valid.sum() >= 1   # the one pixel with a return is drawn (possibly more than once)
    np.testing.assert_allclose(np.asarray(tg['depth'])[valid], expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tg['color'])[valid], [[1.0, 0.0, 0.0]] * valid.sum(),
                               atol=1e-6)


def test_bev_colour_only_where_the_top_return_is_visible():
  box_min, box_max = CONFIG.volume_bounds
  grid = CONFIG.volume_shape[:2]
  # On one line of sight of camera 0 (at (0, 0.5, -0.3)), off x = 0, a BEV cell edge.
  near, far = [0.1, 5, -0.3, 0, 0], [0.1 * 9.5 / 4.5, 10, -0.3, 0, 0]
  cells = _bev_cells(_scene([near, far]))
  cell = (box_max[0] - box_min[0]) / grid[0]
  flat = lambda p: int((p[0] - box_min[0]) // cell) * grid[1] + int((p[1] - box_min[1]) // cell)
  depth_valid, color_valid = np.asarray(cells['depth_valid']), np.asarray(cells['color_valid'])
  assert depth_valid.sum() == 2 and depth_valid[flat(near)] and depth_valid[flat(far)]
  # The far point hides behind the near one in camera 0 (and no other camera sees it).
  assert color_valid[flat(near)] and not color_valid[flat(far)] and color_valid.sum() == 1
  np.testing.assert_allclose(np.asarray(cells['color'])[flat(near)], [1, 0, 0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(cells['image_source'])[flat(near)][0], 0)
  np.testing.assert_array_equal(np.asarray(cells['lidar_cell'])[flat(far)],
                                divmod(flat(far), grid[1]))


def test_bev_targets_take_the_highest_key_frame_return_per_cell():
  config = CONFIG
  ex = _example(config)
  box_min, box_max = config.volume_bounds
  grid = config.volume_shape[:2]
  cells = _bev_cells(ex)
  p = np.asarray(ex['points'])
  p = p[np.asarray(ex['points_mask']) & (p[:, 4] == 0)][:, :3]
  cell = (box_max[0] - box_min[0]) / grid[0]
  ij = np.floor((p[:, :2] - np.array(box_min[:2])) / cell).astype(int)
  top = np.full(grid, -np.inf)
  np.maximum.at(top, (ij[:, 0], ij[:, 1]), p[:, 2])
  expected = np.where(np.isfinite(top), box_max[2] - top, 0.0).reshape(-1)
  np.testing.assert_allclose(np.asarray(cells['depth']), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cells['depth_valid']), np.isfinite(top).reshape(-1))


def test_rays_that_leave_through_the_sky_without_a_return_are_background():
  config = CONFIG.replace(perspective_rays=512)
  tg = _draw(config, _scene([[0, 5, -0.3, 0, 0]]))['perspective']
  dz, bg = np.asarray(tg['dirs'])[:, 2], np.asarray(tg['background'])
  random = np.arange(512) >= 256
  # Upward rays leave through the top or the sides; downward ones (dz < -0.1) reach the floor
  # (z = -3 from a camera at -0.3) within the +-32 m box.
  assert bg[random & (dz > 0)].all() and (random & (dz > 0)).sum() > 20
  assert not bg[random & (dz < -0.1)].any() and (random & (dz < -0.1)).sum() > 20
  assert not bg[~random].any()


def test_hidden_targets_follow_the_encoder_masks_and_the_weight_modes():
  p = CONFIG.model.patch_size
  image_mask = np.zeros((1, 6, 4, 11), bool)
  image_mask[0, 2, 1, 3] = True
  block_mask = np.zeros((1, 32, 32), bool)
  block_mask[0, 5, 7] = True
  feats = dict(image_mask=jnp.asarray(image_mask), lidar_block_mask=jnp.asarray(block_mask))
  # Ray 0: colour from a pixel of the masked patch, depth from the dropped block; ray 1: the
  # neighbouring pixel (next patch) and block; ray 2: a background ray.
  rays = dict(image_source=jnp.array([[[2, p + 1, 3 * p + p - 1], [2, p + 1, 4 * p], [0, 0, 0]]]),
              lidar_cell=jnp.array([[[5, 7], [5, 8], [0, 0]]]),
              background=jnp.array([[False, False, True]]))
  color, depth = losses.hidden_targets(CONFIG, rays, feats)
  np.testing.assert_array_equal(color, [[True, False, False]])
  np.testing.assert_array_equal(depth, [[True, False, False]])
  expected = {'all': [1, 1, 1], 'masked': [1, 0, 0], 'weighted': [3, 1, 1]}
  for mode, w in expected.items():
    wc, wd = losses.target_weights(CONFIG.replace(masked_weight=3.0), rays, feats, mode)
    np.testing.assert_allclose(wc, [w], err_msg=mode)
    np.testing.assert_allclose(wd, [w], err_msg=mode)
  wc, wd = losses.target_weights(CONFIG.replace(background='exclude'), rays, feats, 'all')
  np.testing.assert_allclose(wc, [[1, 1, 0]])
  np.testing.assert_allclose(wd, [[1, 1, 1]])


def test_weighted_targets_average_with_their_weights():
  out = dict(color=jnp.zeros((3, 3)), color_target=jnp.array([[1.0] * 3, [2.0] * 3, [0.0] * 3]),
             color_valid=jnp.array([3.0, 1.0, 0.0]), depth=jnp.zeros(3),
             depth_target=jnp.array([1.0, 2.0, 4.0]), depth_valid=jnp.array([0.0, 1.0, 1.0]))
  terms = losses.view_terms(out)
  np.testing.assert_allclose(terms['color_loss'], (3 * 1 + 1 * 4) / 4, rtol=1e-6)
  np.testing.assert_allclose(terms['depth_loss'], 3.0, rtol=1e-6)


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
