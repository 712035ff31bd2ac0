"""LiDAR-guided sampling (--sampling=lidar): the occupancy grid, inverse-CDF placement against a
known wall and an empty grid, the stratified path left as it was, gradients through guided
renders, the config's defaults for older runs, and the whole model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from nsmae_jax.config import Config, ConfigError
from nsmae_jax.render import RadianceField, composite, render_rays, stratified_samples
from nsmae_jax.render.guidance import (grid_shape, guided_samples, inverse_cdf_samples,
                                       occupancy_grid, occupancy_lookup)
from nsmae_jax.render.sampling import trilinear_interpolate

BOX = ((-32.0, -32.0, -3.0), (32.0, 32.0, 3.0))
SHAPE = grid_shape(*BOX, 0.5)                     # (128, 128, 12)


def _cell(p):
  lo, hi = np.array(BOX[0]), np.array(BOX[1])
  return tuple(np.floor((np.asarray(p) - lo) / (hi - lo) * np.array(SHAPE)).astype(int))


def _wall(x=20.0):
  """LiDAR returns on the plane x = `x` (|y| <= 4, |z| <= 2.5), 0.25 m apart."""
  y, z = np.meshgrid(np.arange(-4, 4.01, 0.25), np.arange(-2.5, 2.51, 0.25))
  return np.stack([np.full(y.size, x), y.ravel(), z.ravel()], -1).astype(np.float32)


def test_grid_shape_follows_the_cell_size():
  assert SHAPE == (128, 128, 12)
  assert grid_shape((0, 0, 0), (1, 1, 0.1), 0.5) == (2, 2, 1)


def test_occupancy_grid_marks_point_cells_dilated_and_nothing_far():
  points = np.array([[10.1, -5.2, 0.3], [-20.0, 7.7, -2.6], [0.0, 0.0, 0.0],
                     [40.0, 0.0, 0.0]], np.float32)    # the last is outside the box
  valid = np.array([True, True, False, True])
  grid = np.asarray(occupancy_grid(points, valid, *BOX, SHAPE, dilation=1))
  for p in points[:2]:
    i, j, k = _cell(p)
    assert grid[i, j, k] == 1
    assert grid[i + 1, j - 1, min(k + 1, SHAPE[2] - 1)] == 1      # the dilation ring
    assert grid[i + 2, j, k] == 0 and grid[i, j - 2, k] == 0        # two cells away
  assert grid[_cell(points[2])] == 0                               # padding (valid False)
  # Two points, 3x3x3 cells each (the second's ring is cut by the floor of the box).
  assert grid.sum() == 27 + 18
  undilated = np.asarray(occupancy_grid(points, valid, *BOX, SHAPE, dilation=0))
  assert undilated.sum() == 2


def test_occupancy_lookup_reads_the_cell_and_zero_outside():
  grid = occupancy_grid(_wall(), np.ones(len(_wall()), bool), *BOX, SHAPE, dilation=0)
  q = jnp.array([[20.1, 0.0, 0.0], [15.0, 0.0, 0.0], [20.1, 0.0, 3.5], [33.0, 0.0, 0.0]])
  np.testing.assert_array_equal(occupancy_lookup(grid, q, *BOX), [1, 0, 0, 0])


def _wall_ray_samples(num_samples, jitter=None, wall=True):
  points = _wall() if wall else np.zeros((1, 3), np.float32)
  grid = occupancy_grid(points, np.full(len(points), wall), *BOX, SHAPE)[None]
  origins = jnp.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.5]]])
  dirs = jnp.array([[[1.0, 0.0, 0.0], [0.995, 0.0, -0.0998]]])
  near, far = jnp.full((1, 2), 0.5), jnp.full((1, 2), 30.0)
  return guided_samples(grid, origins, dirs, near, far, num_samples, 128, 0.2, *BOX, jitter)


@pytest.mark.parametrize('jittered', [False, True])
def test_guided_samples_are_sorted_inside_and_gather_at_the_wall(jittered):
  s = 16
  jitter = jax.random.uniform(jax.random.key(3), (1, 2, s)) if jittered else None
  t, deltas = _wall_ray_samples(s, jitter)
  t, deltas = np.asarray(t), np.asarray(deltas)
  assert np.all(np.diff(t, axis=-1) >= 0)
  assert np.all(t >= 0.5) and np.all(t <= 30.0)
  np.testing.assert_allclose(deltas.sum(-1), 29.5, rtol=1e-5)
  assert np.all(deltas > 0)
  # The wall is at range ~20 m on both rays; 80% of the pdf is on its (dilated) cells, which
  # span 1.5 m in x, so at least 70% of the samples lie within 1 m of it (stratified: 1/15).
  near_wall = np.abs(t[0, 0] - 20.0) <= 1.0
  assert near_wall.mean() >= 0.7, t[0, 0]
  near_wall = np.abs(t[0, 1] * 0.995 - 20.0) <= 1.0
  assert near_wall.mean() >= 0.7, t[0, 1]


def test_an_empty_grid_gives_stratified_samples():
  t, deltas = _wall_ray_samples(8, wall=False)
  ref_t, ref_d = stratified_samples(None, jnp.float32(0.5), jnp.float32(30.0), 8)
  np.testing.assert_allclose(t[0, 0], ref_t, rtol=1e-5)
  np.testing.assert_allclose(deltas[0, 0], ref_d, rtol=1e-5)


def test_inverse_cdf_follows_a_known_pdf():
  # Occupancy on bins 2..3 of 8 and no floor: every sample lands in [2, 4) (near 0, far 8).
  occ = jnp.array([0, 0, 1, 1, 0, 0, 0, 0], jnp.float32)
  t, _ = inverse_cdf_samples(occ, jnp.float32(0.0), jnp.float32(8.0), 4, 0.0)
  np.testing.assert_allclose(t, [2.25, 2.75, 3.25, 3.75], rtol=1e-6)


def _field_setup():
  field = RadianceField(width=8, depth=1, pos_freqs=2, dir_freqs=1, box_min=BOX[0],
                        box_max=BOX[1])
  params = field.init(jax.random.key(1), jnp.zeros((4, 5)), jnp.zeros((4, 3)),
                      jnp.zeros((4, 3)))
  keys = jax.random.split(jax.random.key(2), 3)
  volume = jax.random.normal(keys[0], (2, 8, 8, 3, 5))
  origins = jax.random.uniform(keys[1], (2, 6, 3), minval=-3, maxval=3)
  dirs = jax.random.normal(keys[2], (2, 6, 3))
  dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
  near, far = jnp.full((2, 6), 0.5), jnp.full((2, 6), 25.0)
  return field, params, volume, origins, dirs, near, far


def test_stratified_render_is_the_plain_quadrature():
  """occupancy=None keeps the stratified path: the same numbers as stratified_samples,
  trilinear_interpolate, the field and composite written out for a fixed key."""
  field, params, volume, origins, dirs, near, far = _field_setup()
  fn = functools.partial(field.apply, params)
  key, s = jax.random.key(7), 5
  out = render_rays(fn, volume, origins, dirs, near, far, s, *BOX, key=key)
  jitter = jax.random.uniform(key, (2, 6, s))
  t, deltas = jax.vmap(jax.vmap(lambda n, f, j: stratified_samples(None, n, f, s, j)))(
      near, far, jitter)
  points = origins[:, :, None] + t[..., None] * dirs[:, :, None]
  feats = jnp.stack([trilinear_interpolate(volume[b], points[b].reshape(-1, 3), *BOX)
                     for b in range(2)])
  density, color = fn(feats.reshape(-1, 5), points.reshape(-1, 3),
                      jnp.broadcast_to(dirs[:, :, None], points.shape).reshape(-1, 3))
  ref = composite(density.reshape(2, 6, s), color.reshape(2, 6, s, 3), t, deltas, far)
  np.testing.assert_array_equal(out['t'], t)
  for name in ('color', 'depth', 'weights'):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('remat', [False, True])
def test_guided_render_is_finite_and_trains_field_and_volume(remat):
  field, params, volume, origins, dirs, near, far = _field_setup()
  points = jax.random.uniform(jax.random.key(4), (2, 64, 3), minval=-8, maxval=8)
  grid = jax.vmap(lambda p: occupancy_grid(p, jnp.ones(64, bool), *BOX, SHAPE))(points)

  def loss(params, volume):
    out = render_rays(functools.partial(field.apply, params), volume, origins, dirs, near, far,
                      6, *BOX, key=jax.random.key(0), occupancy=grid, remat=remat)
    return jnp.mean(out['depth']) + jnp.mean(out['color']), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params, volume)
  assert np.isfinite(value) and out['t'].shape == (2, 6, 6)
  assert np.all(np.diff(np.asarray(out['t']), axis=-1) >= 0)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


def test_older_configs_load_with_stratified_sampling():
  old = Config().to_dict()
  for name in ('sampling', 'coarse_samples', 'uniform_fraction', 'occupancy_cell',
               'occupancy_dilation'):
    del old['render'][name]
  assert Config.from_dict(old).render.sampling == 'stratified'
  assert Config.from_dict(old) == Config()


def test_bad_sampling_values_name_the_flag():
  with pytest.raises(ConfigError, match='--sampling: must be stratified or lidar'):
    Config().replace(sampling='importance').validate()
  with pytest.raises(ConfigError, match='--uniform_fraction'):
    Config().replace(uniform_fraction=1.5).validate()


def test_sampling_flags_exist():
  from experiments import flags as nsflags  # pylint: disable=import-outside-toplevel
  for name in ('sampling', 'coarse_samples', 'uniform_fraction', 'occupancy_cell',
               'occupancy_dilation'):
    assert name in nsflags.FLAGS


# Small model (as tests/test_models.py): compile time dominates.
SMALL = dict(vit_width=32, vit_depth=1, vit_heads=2, pillar_features=16, bev_channels=16,
             volume_channels=8, max_points=1024, perspective_rays=32, bev_rays=16,
             num_samples=8, field_width=16, sampling='lidar', coarse_samples=32)


def test_model_render_refuses_lidar_sampling_without_occupancy():
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  model = pretrain.build_pretrain_model(tiny_config(**SMALL, background='black'))
  with pytest.raises(ValueError, match='--sampling=lidar with occupancy missing'):
    model.apply({'params': {}}, jnp.zeros((1, 2, 2, 2, 8)), jnp.zeros((1, 3, 3)),
                jnp.ones((1, 3, 3)), jnp.zeros((1, 3)), None, method=model.render)


@pytest.mark.slow  # compiles the train step and the full-view renderer (~2-3 min on 2 cores)
def test_model_with_lidar_sampling_has_finite_loss_gradients_and_views():
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  from nsmae_jax.pretrain import losses  # pylint: disable=import-outside-toplevel
  config = tiny_config(**SMALL)
  task = pretrain.pretrain_task(config)
  batch = jax.tree.map(jnp.asarray, fake_batch(config, 1, seed=0))
  params = jax.jit(task.init_params)(jax.random.key(0), batch)
  step = jax.jit(jax.value_and_grad(
      lambda p: losses.pretrain_loss(task.model, p, batch, jax.random.key(1)), has_aux=True))
  (loss, aux), grads = step(params)
  assert np.isfinite(loss) and np.isfinite(aux['metrics']['depth_abs_rel'])
  for name, tree in pretrain.param_groups(grads).items():
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    assert norm > 0 and np.isfinite(norm), name
  views = losses.render_views(task.model, params, batch)
  assert views['perspective_depth'].shape == (config.data.image_height, config.data.image_width)
  assert views['bev_depth'].shape == config.volume_shape[:2]
  assert all(np.all(np.isfinite(views[k])) for k in ('perspective_color', 'perspective_depth',
                                                      'bev_color', 'bev_depth'))
