"""LiDAR-guided sampling (--sampling=lidar): the occupancy grid, inverse-CDF placement against a
known wall and an empty grid, the stratified path left as it was, gradients through guided
renders, free-space carving (--free_space_carving: the three-state grid and its pdf), the
config's defaults for older runs, and the whole model."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import flat_draw, tiny_config
from nsmae_jax.config import Config, ConfigError
from nsmae_jax.render import RadianceField, composite, render_rays, stratified_samples
from nsmae_jax.render import guidance
from nsmae_jax.render.guidance import UNKNOWN, carving_steps, grid_shape
from nsmae_jax.render.sampling import trilinear_interpolate

BOX = ((-32.0, -32.0, -3.0), (32.0, 32.0, 3.0))
SHAPE = grid_shape(*BOX, 0.5)                     # (128, 128, 12)

# The functions under test, jitted (the box, grid shape, counts and switches static): one
# compilation per call signature instead of an eager dispatch, and compilation, of every op.
_BOX_ARGS = ('box_min', 'box_max')
occupancy_grid = jax.jit(guidance.occupancy_grid,
                         static_argnames=_BOX_ARGS + ('shape', 'dilation'))
free_space_grid = jax.jit(guidance.free_space_grid,
                          static_argnames=_BOX_ARGS + ('shape', 'margin', 'chunk'))
carved_occupancy_grid = jax.jit(guidance.carved_occupancy_grid,
                                static_argnames=_BOX_ARGS + ('shape', 'dilation', 'margin',
                                                             'chunk'))
occupancy_lookup = jax.jit(guidance.occupancy_lookup, static_argnames=_BOX_ARGS + ('outside',))
inverse_cdf_samples = jax.jit(guidance.inverse_cdf_samples,
                              static_argnames=('num_samples', 'uniform_fraction', 'carving'))
guided_samples = jax.jit(guidance.guided_samples,
                         static_argnames=_BOX_ARGS + ('num_samples', 'coarse_samples',
                                                      'uniform_fraction', 'carving'))


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
  return _wall_ray_samples_of(points, np.full(len(points), wall), jitter, num_samples)


@functools.partial(jax.jit, static_argnums=3)
def _wall_ray_samples_of(points, valid, jitter, num_samples):
  grid = guidance.occupancy_grid(points, valid, *BOX, SHAPE)[None]
  origins = jnp.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.5]]])
  dirs = jnp.array([[[1.0, 0.0, 0.0], [0.995, 0.0, -0.0998]]])
  near, far = jnp.full((1, 2), 0.5), jnp.full((1, 2), 30.0)
  return guidance.guided_samples(grid, origins, dirs, near, far, num_samples, 128, 0.2, *BOX,
                                 jitter)


@pytest.mark.parametrize('jittered', [False, True])
def test_guided_samples_are_sorted_inside_and_gather_at_the_wall(jittered):
  s = 16
  jitter = flat_draw(jax.random.uniform, jax.random.key(3), (1, 2, s)) if jittered else None
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
  ref_t, ref_d = jax.jit(stratified_samples, static_argnums=3)(None, jnp.float32(0.5),
                                                               jnp.float32(30.0), 8)
  np.testing.assert_allclose(t[0, 0], ref_t, rtol=1e-5)
  np.testing.assert_allclose(deltas[0, 0], ref_d, rtol=1e-5)


def test_inverse_cdf_follows_a_known_pdf():
  # Occupancy on bins 2..3 of 8 and no floor: every sample lands in [2, 4) (near 0, far 8).
  occ = jnp.array([0, 0, 1, 1, 0, 0, 0, 0], jnp.float32)
  t, _ = inverse_cdf_samples(occ, jnp.float32(0.0), jnp.float32(8.0), 4, 0.0)
  np.testing.assert_allclose(t, [2.25, 2.75, 3.25, 3.75], rtol=1e-6)


def _binary_reference(occupancy, near, far, num_samples, uniform_fraction, jitter=None):
  """inverse_cdf_samples as it was before free-space carving, written out."""
  m = occupancy.shape[-1]
  total = jnp.sum(occupancy)
  a = jnp.where(total > 0, uniform_fraction, 1.0)
  pdf = (1.0 - a) * occupancy / jnp.maximum(total, 1e-12) + a / m
  cdf = jnp.concatenate([jnp.zeros((1,), pdf.dtype), jnp.cumsum(pdf)])
  cdf = cdf / cdf[-1]
  offset = 0.5 if jitter is None else jitter
  u = (jnp.arange(num_samples, dtype=pdf.dtype) + offset) / num_samples
  bin_ = jnp.clip(jnp.searchsorted(cdf, u, side='right') - 1, 0, m - 1)
  frac = jnp.clip((u - cdf[bin_]) / jnp.maximum(pdf[bin_], 1e-12), 0.0, 1.0)
  t = near + (bin_ + frac) * (far - near) / m
  return t, jnp.diff(jnp.concatenate([near[None], 0.5 * (t[1:] + t[:-1]), far[None]]))


@pytest.mark.parametrize('jittered', [False, True])
def test_carving_off_is_the_binary_sampler(jittered):
  occ = (jax.random.uniform(jax.random.key(5), (6, 32)) > 0.8).astype(jnp.float32)
  near, far = jnp.full((6,), 0.5), jnp.linspace(5.0, 40.0, 6)
  jitter = jax.random.uniform(jax.random.key(6), (6, 8)) if jittered else None
  in_axes = (0, 0, 0, 0 if jittered else None)

  @jax.jit
  def run(occ, near, far, jitter):
    new = jax.vmap(lambda o, n, f, j: guidance.inverse_cdf_samples(o, n, f, 8, 0.2, j,
                                                                   carving=False),
                   in_axes=in_axes)(occ, near, far, jitter)
    ref = jax.vmap(lambda o, n, f, j: _binary_reference(o, n, f, 8, 0.2, j),
                   in_axes=in_axes)(occ, near, far, jitter)
    # A three-state grid with nothing carved (unknown where the binary grid has 0) gives the
    # binary sampler's pdf: the floor over the not-free bins is the floor over all of them.
    carved = jnp.where(occ > 0, 1.0, UNKNOWN)
    same = jax.vmap(lambda o, n, f, j: guidance.inverse_cdf_samples(o, n, f, 8, 0.2, j,
                                                                    carving=True),
                    in_axes=in_axes)(carved, near, far, jitter)
    return new, ref, same

  new, ref, same = run(occ, near, far, jitter)
  for a, b in zip(new, ref):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(same[0], ref[0], rtol=1e-5)


def test_carved_grid_is_free_before_the_wall_occupied_at_it_unknown_behind():
  # The wall's returns plus one return outside the box (x = 40), whose in-box part carves.
  points = np.concatenate([_wall(), [[40.0, -10.0, 0.0]]]).astype(np.float32)
  valid = np.ones(len(points), bool)
  grid = np.asarray(carved_occupancy_grid(points, valid, *BOX, SHAPE))
  assert set(np.unique(grid)) == {0.0, UNKNOWN, 1.0}
  for x in (1.0, 5.0, 10.0, 15.0, 18.9):                   # between the sensor and the wall
    for y, z in ((0.0, 0.1), (2.0, 1.0), (-3.0, -2.0)):
      assert grid[_cell((x, y * x / 20.0, z * x / 20.0))] == 0, (x, y, z)   # on a ray
  for y, z in ((0.0, 0.1), (3.9, 2.4), (-4.0, -2.5)):
    assert grid[_cell((20.1, y, z))] == 1                  # the wall
    assert grid[_cell((19.6, y, z))] == 1                  # its dilation wins over free
  for x in (21.6, 25.0, 31.9):
    assert grid[_cell((x, 0.0, 0.1))] == UNKNOWN           # behind the wall
  assert grid[_cell((10.0, 10.0, 0.1))] == UNKNOWN         # no ray went there
  assert grid[_cell((10.0, 0.0, 2.9))] == UNKNOWN          # above the scan
  # The out-of-box return: its ray (y = -x / 4, z = 0) is free up to the box, nothing occupied.
  for x in (8.3, 19.7, 27.9, 31.9):
    assert grid[_cell((x, -x / 4, 0.0))] == 0, x
  wall = occupancy_grid(_wall(), np.ones(len(_wall()), bool), *BOX, SHAPE)
  np.testing.assert_array_equal(grid == 1, np.asarray(wall) == 1)
  # Padding carves nothing.
  none = np.asarray(carved_occupancy_grid(points, np.zeros(len(points), bool), *BOX, SHAPE))
  assert np.all(none == UNKNOWN)


def test_free_space_grid_is_the_same_in_chunks():
  points, valid = _wall(), np.ones(len(_wall()), bool)
  k = carving_steps(*BOX, SHAPE)
  assert k == 183                      # 45.35 m farthest corner / 0.25 m steps, + 1
  whole = free_space_grid(points, valid, *BOX, SHAPE)
  chunked = free_space_grid(points, valid, *BOX, SHAPE, chunk=7 * len(points))   # 27 chunks
  np.testing.assert_array_equal(whole, chunked)
  assert 0 < float(whole.sum()) < whole.size


def _carved_wall_ray(num_samples, carving, far=30.0, jitter=None):
  """One ray from the sensor straight at the wall (x = 20 m) of _wall()."""
  points = _wall()
  build = carved_occupancy_grid if carving else occupancy_grid
  grid = build(points, np.ones(len(points), bool), *BOX, SHAPE)[None]
  origins, dirs = jnp.zeros((1, 1, 3)), jnp.array([[[1.0, 0.0, 0.0]]])
  near, far = jnp.full((1, 1), 0.5), jnp.full((1, 1), far)
  t, deltas = guided_samples(grid, origins, dirs, near, far, num_samples, 128, 0.2, *BOX, jitter,
                             carving)
  return grid[0], np.asarray(t[0, 0]), np.asarray(deltas[0, 0])


@pytest.mark.parametrize('jittered', [False, True])
def test_carving_puts_no_samples_in_free_space_and_more_at_the_wall(jittered):
  s = 32
  jitter = flat_draw(jax.random.uniform, jax.random.key(8), (1, 1, s)) if jittered else None
  # The ray leaves the volume 2 m behind the wall: the carved floor goes to the wall's cells
  # and the 1 m of unknown behind them, the binary one mostly to the free 19 m in front.
  grid, t, deltas = _carved_wall_ray(s, True, far=22.0, jitter=jitter)
  _, t_bin, _ = _carved_wall_ray(s, False, far=22.0, jitter=jitter)
  state = np.asarray(occupancy_lookup(grid, jnp.stack([t, 0 * t, 0 * t], -1), *BOX))
  free_bin = np.asarray(occupancy_lookup(grid, jnp.stack([t_bin, 0 * t_bin, 0 * t_bin], -1),
                                         *BOX)) == 0
  # The free cells run from the sensor to 19.5 m: the binary sampler's floor puts ~18% of its
  # samples there, the carved one none, beyond the coarse bin (0.17 m) that straddles 19.5 m.
  bin_width = 21.5 / 128
  assert np.sum((state == 0) & (t < 19.5 - bin_width)) == 0, t
  assert np.sum(free_bin & (t_bin < 19.5 - bin_width)) >= 3, t_bin
  assert np.sum(np.abs(t - 20.0) <= 1.0) > np.sum(np.abs(t_bin - 20.0) <= 1.0), (t, t_bin)
  assert np.all(np.diff(t) >= 0) and np.all(t >= 0.5) and np.all(t <= 22.0)
  np.testing.assert_allclose(deltas.sum(), 21.5, rtol=1e-5)


def test_carved_samples_without_occupied_bins_follow_the_unknown_ones():
  # a = 1: all of the pdf uniform over the not-free (unknown) bins 4..7 of 8.
  occ = jnp.array([0, 0, 0, 0] + [UNKNOWN] * 4, jnp.float32)
  t, _ = inverse_cdf_samples(occ, jnp.float32(0.0), jnp.float32(8.0), 4, 0.2, carving=True)
  np.testing.assert_allclose(t, [4.5, 5.5, 6.5, 7.5], rtol=1e-6)


@pytest.mark.parametrize('jittered', [False, True])
def test_all_free_bins_fall_back_to_uniform(jittered):
  jitter = jax.random.uniform(jax.random.key(9), (8,)) if jittered else None
  t, deltas = inverse_cdf_samples(jnp.zeros(64), jnp.float32(0.5), jnp.float32(30.0), 8, 0.2,
                                  jitter, carving=True)
  t, deltas = np.asarray(t), np.asarray(deltas)
  assert np.all(np.isfinite(t)) and np.all(np.diff(t) > 0)
  assert t[0] < 0.5 + 29.5 / 8 and t[-1] > 30.0 - 29.5 / 8 and 0.5 <= t[0] and t[-1] <= 30.0
  np.testing.assert_allclose(deltas.sum(), 29.5, rtol=1e-5)
  if not jittered:
    np.testing.assert_allclose(t, stratified_samples(None, jnp.float32(0.5), jnp.float32(30.0),
                                                     8)[0], rtol=1e-5)


def test_carving_jits_and_vmaps_over_a_batch():
  points = jnp.stack([_wall(20.0), _wall(-12.0)])
  valid = jnp.ones(points.shape[:2], bool).at[1, ::2].set(False)
  build = jax.jit(jax.vmap(lambda p, v: guidance.carved_occupancy_grid(p, v, *BOX, SHAPE)))
  grids = build(points, valid)
  for b in range(2):
    np.testing.assert_array_equal(grids[b], carved_occupancy_grid(points[b], valid[b], *BOX,
                                                                  SHAPE))
  origins = jnp.zeros((2, 3, 3))
  dirs = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  dirs = jnp.broadcast_to(dirs, (2, 3, 3))
  near, far = jnp.full((2, 3), 0.5), jnp.full((2, 3), 31.0)
  jitter = flat_draw(jax.random.uniform, jax.random.key(10), (2, 3, 16))
  sample = jax.jit(lambda g, j: guidance.guided_samples(g, origins, dirs, near, far, 16, 128,
                                                        0.2, *BOX, j, carving=True))
  t, deltas = sample(grids, jitter)
  t = np.asarray(t)
  assert np.all(np.isfinite(t)) and np.all(np.diff(t, axis=-1) >= 0)
  np.testing.assert_allclose(np.asarray(deltas).sum(-1), 30.5, rtol=1e-5)
  assert np.mean(np.abs(t[0, 0] - 20.0) <= 1.0) >= 0.75     # each example's own wall
  assert np.mean(np.abs(t[1, 1] - 12.0) <= 1.0) >= 0.75
  assert np.mean(np.abs(t[0, 1] - 12.0) <= 1.0) < 0.2


def test_render_rays_threads_carving_to_the_sampler():
  field, params, volume, origins, dirs, near, far = _field_setup()
  points = flat_draw(jax.random.uniform, jax.random.key(4), (2, 64, 3), minval=-8, maxval=8)
  grid = jax.jit(jax.vmap(lambda p: guidance.carved_occupancy_grid(p, jnp.ones(64, bool), *BOX,
                                                                    SHAPE)))(points)
  out = jax.jit(lambda g: render_rays(functools.partial(field.apply, params), volume, origins,
                                      dirs, near, far, 6, *BOX, key=None, occupancy=g,
                                      free_space_carving=True))(grid)
  t, _ = guided_samples(grid, origins, dirs, near, far, 6, 128, 0.2, *BOX, carving=True)
  np.testing.assert_array_equal(out['t'], t)
  assert np.all(np.isfinite(np.asarray(out['depth'])))


@functools.cache
def _field_setup():
  field = RadianceField(width=8, depth=1, pos_freqs=2, dir_freqs=1, box_min=BOX[0],
                        box_max=BOX[1])

  @jax.jit  # one compilation rather than an eager init
  def arrays():
    params = field.init(jax.random.key(1), jnp.zeros((4, 5)), jnp.zeros((4, 3)),
                        jnp.zeros((4, 3)))
    keys = jax.random.split(jax.random.key(2), 3)
    volume = flat_draw(jax.random.normal, keys[0], (2, 8, 8, 3, 5))
    origins = flat_draw(jax.random.uniform, keys[1], (2, 6, 3), minval=-3, maxval=3)
    dirs = flat_draw(jax.random.normal, keys[2], (2, 6, 3))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    near, far = jnp.full((2, 6), 0.5), jnp.full((2, 6), 25.0)
    return params, volume, origins, dirs, near, far

  return (field,) + arrays()


def test_stratified_render_is_the_plain_quadrature():
  """occupancy=None keeps the stratified path: the same numbers as stratified_samples,
  trilinear_interpolate, the field and composite written out for a fixed key."""
  field, params, volume, origins, dirs, near, far = _field_setup()
  fn = functools.partial(field.apply, params)
  key, s = jax.random.key(7), 5

  def reference(key):
    jitter = jax.random.uniform(key, (2, 6, s))
    t, deltas = jax.vmap(jax.vmap(lambda n, f, j: stratified_samples(None, n, f, s, j)))(
        near, far, jitter)
    points = origins[:, :, None] + t[..., None] * dirs[:, :, None]
    feats = jnp.stack([trilinear_interpolate(volume[b], points[b].reshape(-1, 3), *BOX)
                       for b in range(2)])
    density, color = fn(feats.reshape(-1, 5), points.reshape(-1, 3),
                        jnp.broadcast_to(dirs[:, :, None], points.shape).reshape(-1, 3))
    return t, composite(density.reshape(2, 6, s), color.reshape(2, 6, s, 3), t, deltas, far)

  # One compilation: the renderer and the reference.
  out, (t, ref) = jax.jit(lambda k: (
      render_rays(fn, volume, origins, dirs, near, far, s, *BOX, key=k), reference(k)))(key)
  np.testing.assert_array_equal(out['t'], t)
  for name in ('color', 'depth', 'weights'):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


@functools.cache
def _guided_render_grads():
  """((loss, render_rays outputs), grads w.r.t. field params and volume) of a guided render
  without and with remat, in one compilation."""
  field, params, volume, origins, dirs, near, far = _field_setup()
  points = flat_draw(jax.random.uniform, jax.random.key(4), (2, 64, 3), minval=-8, maxval=8)
  grid = jax.vmap(lambda p: occupancy_grid(p, jnp.ones(64, bool), *BOX, SHAPE))(points)

  def value_and_grad(remat):
    def loss(params, volume):
      out = render_rays(functools.partial(field.apply, params), volume, origins, dirs, near,
                        far, 6, *BOX, key=jax.random.key(0), occupancy=grid, remat=remat)
      return jnp.mean(out['depth']) + jnp.mean(out['color']), out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  return jax.jit(lambda p, v: (value_and_grad(False)(p, v), value_and_grad(True)(p, v)))(
      params, volume)


@pytest.mark.parametrize('remat', [False, True])
def test_guided_render_is_finite_and_trains_field_and_volume(remat):
  (value, out), grads = _guided_render_grads()[remat]
  assert np.isfinite(value) and out['t'].shape == (2, 6, 6)
  assert np.all(np.diff(np.asarray(out['t']), axis=-1) >= 0)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


def test_older_configs_load_with_stratified_sampling():
  old = Config().to_dict()
  for name in ('sampling', 'coarse_samples', 'uniform_fraction', 'occupancy_cell',
               'occupancy_dilation', 'free_space_carving'):
    del old['render'][name]
  assert Config.from_dict(old).render.sampling == 'stratified'
  assert Config.from_dict(old) == Config()


def test_bad_sampling_values_name_the_flag():
  with pytest.raises(ConfigError, match='--sampling: must be stratified or lidar'):
    Config().replace(sampling='importance').validate()
  with pytest.raises(ConfigError, match='--uniform_fraction'):
    Config().replace(uniform_fraction=1.5).validate()
  with pytest.raises(ConfigError, match='--free_space_carving: needs --sampling=lidar'):
    Config().replace(free_space_carving=True).validate()
  Config().replace(sampling='lidar', free_space_carving=True).validate()


def test_sampling_flags_exist():
  from experiments import flags as nsflags  # pylint: disable=import-outside-toplevel
  for name in ('sampling', 'coarse_samples', 'uniform_fraction', 'occupancy_cell',
               'occupancy_dilation', 'free_space_carving'):
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


@pytest.mark.parametrize('carving', [False, True])
def test_model_occupancy_is_three_state_with_carving(carving):
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  config = tiny_config(**SMALL, background='black', free_space_carving=carving)
  model = pretrain.build_pretrain_model(config)
  points = jnp.concatenate([jnp.asarray(_wall()), jnp.zeros((len(_wall()), 1))], -1)[None]
  batch = {'points': points, 'points_mask': jnp.ones(points.shape[:2], bool)}
  grid = jax.jit(lambda b: model.apply({'params': {}}, b, method=model.occupancy))(batch)
  lo, hi = config.volume_bounds
  shape = grid_shape(lo, hi, config.render.occupancy_cell)
  build = carved_occupancy_grid if carving else occupancy_grid
  np.testing.assert_array_equal(grid[0], build(_wall(), np.ones(len(_wall()), bool), lo, hi,
                                               shape, config.render.occupancy_dilation))
  assert set(np.unique(np.asarray(grid))) == ({0.0, UNKNOWN, 1.0} if carving else {0.0, 1.0})


@pytest.mark.slow  # builds the pre-training model (~12 s; fast tier: < 2 min)
def test_model_render_passes_carving_to_the_sampler():
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render import box_near_far  # pylint: disable=import-outside-toplevel
  config = tiny_config(**SMALL, background='black', free_space_carving=True)
  model = pretrain.build_pretrain_model(config)
  lo, hi = config.volume_bounds
  grid = carved_occupancy_grid(_wall(), np.ones(len(_wall()), bool), lo, hi,
                               grid_shape(lo, hi, config.render.occupancy_cell))[None]
  channels = 8
  volume = jnp.zeros((1,) + config.volume_shape + (channels,))
  origins = jnp.zeros((1, 2, 3))
  dirs = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
  near = jnp.full((1, 2), 0.5)
  args = (volume, origins, dirs, near, None, grid)
  params = jax.jit(lambda k: model.init(k, *args, method=model.render))(jax.random.key(0))
  out = jax.jit(lambda p: model.apply(p, *args, method=model.render))(params)
  n, f, _ = box_near_far(origins, dirs, lo, hi, near)
  t, _ = guided_samples(grid, origins, dirs, n, f, config.render.num_samples,
                        config.render.coarse_samples, config.render.uniform_fraction, lo, hi,
                        carving=True)
  np.testing.assert_allclose(out['t'], t, rtol=1e-6)


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


def test_quadrature_table_charges_the_ideal_proposal_its_coarse_pass():
  """sampling_study.table: ideal:S[:a] rows show the recorded S + coarse evaluations per ray,
  seeds of a model are averaged, rows from before field_evals was recorded show S; a
  malformed ideal name is refused."""
  from experiments import sampling_study  # pylint: disable=import-outside-toplevel
  q = lambda v, **kw: dict(vs_converged=v, perspective_depth_loss=1.5, depth_abs_rel=0.15,
                           rays=10, **kw)
  results = {'train': {}, 'eval': {}, 'quadrature_reference': 'stratified:512', 'quadrature': {
      'stratified:16@ideal:8:0.2': q(0.2, field_evals=136),
      'stratified:16:1@ideal:8:0.2': q(0.4, field_evals=136),
      'stratified:16@stratified:8': q(0.3)}}
  text = sampling_study.table(results)
  assert '| stratified:16 | ideal:8:0.2 | 136 | 2 | 0.300 +- 0.100 | 1.500 +- 0.000 |' in text
  assert '| stratified:16 | stratified:8 | 8 | 1 | 0.300 |' in text
  assert sampling_study.field_evals('ideal:4', 128) == 132
  assert sampling_study.field_evals('lidar:4:1', 128) == 4
  with pytest.raises(ValueError, match='ideal:8:0.2:3'):
    sampling_study.field_evals('ideal:8:0.2:3', 128)


def test_learned_field_quadrature_scores_a_model_against_its_own_dense_render(
    converted_data_dir, synthetic_dataroot):
  """experiments.sampling_study.quadrature on the tiny world's val frames with seeded random
  weights: a sampler scored against itself is off by exactly 0; the stratified error against
  a 256-sample render shrinks from 4 to 64 samples; the guided sampler runs through the same
  model path (occupancy from the batch) and gives a finite error; the ideal proposal with a
  uniform pdf reproduces stratified sampling; the same rays are scored by every sampler."""
  from experiments.sampling_study import quadrature  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  from nsmae_jax.pretrain import pretrain_task  # pylint: disable=import-outside-toplevel
  from helpers import random_params  # pylint: disable=import-outside-toplevel
  small = {k: v for k, v in SMALL.items() if k not in ('sampling', 'num_samples', 'max_points')}
  config = tiny_config(**small, data_dir=converted_data_dir, dataroot=synthetic_dataroot,
                       background='black')
  params = random_params(pretrain_task(config).init_params, jax.random.key(0),
                         jax.tree.map(jnp.asarray, fake_batch(config, 1)))
  score = lambda name, ref: quadrature(config, params, name, ref)
  same = score('stratified:16', 'stratified:16')
  assert same['vs_converged'] == 0.0 and same['rays'] > 0
  assert np.isfinite(same['perspective_depth_loss']) and same['perspective_depth_loss'] > 0
  coarse, fine = score('stratified:4', 'stratified:256'), score('stratified:64', 'stratified:256')
  assert 0 < fine['vs_converged'] < coarse['vs_converged']
  guided = score('lidar:8', 'stratified:256')
  assert np.isfinite(guided['vs_converged']) and guided['vs_converged'] > 0
  assert coarse['rays'] == fine['rays'] == guided['rays'] == same['rays']
  # The ideal proposal with an all-uniform pdf places the stratified bin centres; with the
  # field's weights it charges its coarse pass and still scores the same rays.
  uniform, stratified = score('ideal:8:1.0', 'stratified:256'), score('stratified:8',
                                                                     'stratified:256')
  assert abs(uniform['vs_converged'] - stratified['vs_converged']) < 1e-4
  assert uniform['field_evals'] == 8 + config.render.coarse_samples
  assert stratified['field_evals'] == 8
  ideal = score('ideal:8', 'stratified:256')
  assert np.isfinite(ideal['vs_converged']) and ideal['rays'] == same['rays']
  assert ideal['vs_converged'] != stratified['vs_converged']


def test_study_rescores_a_restored_run_that_died_in_its_final_eval(monkeypatch):
  """sampling_study._train: when train_and_evaluate restores a finished run without eval
  metrics (it died in its final eval), the held-out metrics come from _rescore with the
  setting's own sampler; a run with them is not re-scored. (Control flow only: the training
  and the scoring are stubs here; the real path ran in session 15's study.)"""
  from experiments import sampling_study  # pylint: disable=import-outside-toplevel
  calls = []
  evals = {'eval_depth_abs_rel': 0.2, 'eval_perspective_depth_loss': 1.5}
  state = types.SimpleNamespace(params={'p': 1})
  monkeypatch.setattr(sampling_study, '_workdir', lambda name: '/nonexistent/' + name)
  monkeypatch.setattr(sampling_study, 'pretrain_task', lambda config: None)
  monkeypatch.setattr(sampling_study.train, 'train_and_evaluate',
                      lambda config, workdir, task: (state, dict(evals)))
  monkeypatch.setattr(sampling_study, '_rescore', lambda base, params, name, split='val': (
      calls.append((name, split)) or {'depth_abs_rel': 0.3, 'perspective_depth_loss': 1.7}))
  monkeypatch.setattr(sampling_study, '_fit', lambda base, params, name: {'fit_x': 1.0})
  config = tiny_config(**SMALL)
  out, _ = sampling_study._train(config, 'lidar:8:2')
  assert out['depth_abs_rel'] == 0.2 and out['fit_x'] == 1.0 and not calls
  evals.clear()
  out, _ = sampling_study._train(config, 'lidar:8:2')
  assert calls == [('lidar:8:2', 'val')]
  assert out['depth_abs_rel'] == 0.3 and out['perspective_depth_loss'] == 1.7
  assert 'wall_s' in out and out['fit_x'] == 1.0
  calls.clear()
  sampling_study._train(config, 'lidar:8:2', fit=False)
  assert not calls
