"""Renderer: compositing against a float64 reference and closed forms, sampling, interpolation,
near/far from the volume box (ray geometry itself: test_geometry.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsmae_jax import render
from nsmae_jax.geometry import bev_rays
from nsmae_jax.render import RadianceField, render_rays

BOX = ((-32.0, -32.0, -3.0), (32.0, 32.0, 3.0))

# The functions under test, jitted (counts and the box static): one compilation per call
# signature instead of an eager dispatch, and compilation, of every op.
composite = jax.jit(render.composite)
stratified_samples = jax.jit(render.stratified_samples, static_argnames='num_samples')
trilinear_interpolate = jax.jit(render.trilinear_interpolate,
                                static_argnames=('box_min', 'box_max'))
box_near_far = jax.jit(render.box_near_far, static_argnames=('box_min', 'box_max'))


def _composite_reference(density, color, t, deltas, far):
  """Float64 NeRF quadrature written with explicit products (not the cumsum form)."""
  density, color, t, deltas, far = (np.asarray(a, np.float64)
                                    for a in (density, color, t, deltas, far))
  alpha = 1.0 - np.exp(-density * deltas)
  trans = np.cumprod(np.concatenate([np.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], -1),
                     axis=-1)
  w = trans * alpha
  t_last = trans[..., -1] * (1 - alpha[..., -1])
  return dict(weights=w, color=np.sum(w[..., None] * color, -2), opacity=w.sum(-1),
              depth=np.sum(w * t, -1) + t_last * far)


def test_composite_matches_float64_reference():
  rng = np.random.default_rng(0)
  density = rng.exponential(0.5, size=(64, 32)).astype(np.float32)
  color = rng.uniform(size=(64, 32, 3)).astype(np.float32)
  deltas = rng.uniform(0.05, 1.0, size=(64, 32)).astype(np.float32)
  t = (1.0 + np.cumsum(deltas, -1) - deltas / 2).astype(np.float32)
  far = (1.0 + deltas.sum(-1)).astype(np.float32)
  out = jax.jit(composite)(density, color, t, deltas, far)
  ref = _composite_reference(density, color, t, deltas, far)
  for name in ('weights', 'color', 'opacity', 'depth'):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_constant_density_closed_form():
  sigma, near, far, s = 0.3, 1.0, 9.0, 64
  t, deltas = stratified_samples(None, jnp.float32(near), jnp.float32(far), s)
  out = composite(jnp.full((s,), sigma), jnp.ones((s, 3)), t, deltas, jnp.float32(far))
  d = (far - near) / s
  # Transmittance reaching sample i: exp(-sigma d i); total opacity 1 - exp(-sigma (far - near)).
  np.testing.assert_allclose(out['transmittance'], np.exp(-sigma * d * np.arange(s)), rtol=1e-5)
  np.testing.assert_allclose(out['opacity'], 1 - np.exp(-sigma * (far - near)), rtol=1e-5)
  # Expected depth: a = 1 - e^{-sigma d}, q = 1 - a; sum_i q^i a (near + (i + 1/2) d) + q^s far.
  a, q = 1 - np.exp(-sigma * d), np.exp(-sigma * d)
  geo = a * (1 - q ** s) / (1 - q)
  mean_i = a * q * (1 - s * q ** (s - 1) + (s - 1) * q ** s) / (1 - q) ** 2  # sum_i<s i q^i a
  expected = (near + d / 2) * geo + d * mean_i + q ** s * far
  np.testing.assert_allclose(out['depth'], expected, rtol=1e-5)


def test_background_fills_the_remaining_transmittance():
  rng = np.random.default_rng(1)
  density = rng.exponential(0.2, size=(16, 8)).astype(np.float32)
  color = rng.uniform(size=(16, 8, 3)).astype(np.float32)
  deltas = np.full((16, 8), 0.5, np.float32)
  t = (np.cumsum(deltas, -1) - 0.25).astype(np.float32)
  bg = jnp.array([0.2, 0.4, 0.8])
  black = composite(density, color, t, deltas, jnp.full((16,), 4.0))
  out = composite(density, color, t, deltas, jnp.full((16,), 4.0), background=bg)
  np.testing.assert_allclose(out['color'], black['color'] + (1 - black['opacity'])[:, None] * bg,
                             rtol=1e-5, atol=1e-6)
  # Empty space shows exactly the background; depth and opacity do not depend on it.
  empty = composite(jnp.zeros((8,)), color[0], t[0], deltas[0], jnp.float32(4.0), bg)
  np.testing.assert_allclose(empty['color'], bg, rtol=1e-6)
  np.testing.assert_array_equal(out['depth'], black['depth'])


def test_opaque_slab_gives_its_distance():
  near, far, s, slab = 0.0, 10.0, 100, 6.25
  t, deltas = stratified_samples(None, jnp.float32(near), jnp.float32(far), s)
  density = jnp.where(t >= slab, 1e4, 0.0)
  out = composite(density, jnp.ones((s, 3)), t, deltas, jnp.float32(far))
  first = float(t[np.argmax(np.asarray(t) >= slab)])
  assert abs(first - slab) < (far - near) / s
  np.testing.assert_allclose(out['depth'], first, rtol=1e-6)
  np.testing.assert_allclose(out['opacity'], 1.0, rtol=1e-6)


def test_stratified_samples_stay_in_their_bins_and_eval_is_deterministic():
  t, deltas = stratified_samples(jax.random.key(0), jnp.float32(2.0), jnp.float32(6.0), 8)
  edges = 2.0 + 0.5 * np.arange(9)
  assert np.all((np.asarray(t) >= edges[:-1]) & (np.asarray(t) < edges[1:]))
  np.testing.assert_allclose(deltas, 0.5)
  t_eval, _ = stratified_samples(None, jnp.float32(2.0), jnp.float32(6.0), 8)
  np.testing.assert_allclose(t_eval, edges[:-1] + 0.25)
  t2, _ = stratified_samples(jax.random.key(1), jnp.float32(2.0), jnp.float32(6.0), 8)
  assert not np.allclose(t, t2)


def test_trilinear_reproduces_a_linear_field():
  shape = (8, 6, 4)
  lo, hi = np.array(BOX[0]), np.array(BOX[1])
  cell = (hi - lo) / shape
  centres = np.stack(np.meshgrid(*[lo[a] + (np.arange(n) + 0.5) * cell[a]
                                   for a, n in enumerate(shape)], indexing='ij'), -1)
  coef = np.array([[0.5, -1.0], [2.0, 0.25], [-3.0, 1.0]])
  volume = (centres @ coef).astype(np.float32)                      # [X, Y, Z, 2], linear
  rng = np.random.default_rng(0)
  # Points between the outermost centres (inside the interpolation hull).
  pts = rng.uniform(lo + cell / 2, hi - cell / 2, size=(200, 3)).astype(np.float32)
  got = trilinear_interpolate(jnp.asarray(volume), jnp.asarray(pts), *BOX)
  np.testing.assert_allclose(got, pts @ coef, rtol=1e-4, atol=1e-4)
  # At a centre, the exact cell value.
  np.testing.assert_allclose(trilinear_interpolate(volume, centres[3, 2, 1][None], *BOX)[0],
                             volume[3, 2, 1], rtol=1e-6)


def test_box_near_far():
  o = jnp.array([[1.0, 2.0, 3.0], [40.0, 0.0, 3.0]])
  d = jnp.broadcast_to(jnp.array([0.0, 0.0, -1.0]), o.shape)
  near, far, hit = box_near_far(o, d, *BOX, near=0.0)
  np.testing.assert_allclose(near[0], 0.0, atol=1e-6)
  np.testing.assert_allclose(far[0], 6.0, rtol=1e-6)
  assert bool(hit[0]) and not bool(hit[1])  # x = 40 is outside the +-32 m box
  # A ray from the centre along +x leaves at x = 32; near bound respected.
  near, far, hit = box_near_far(jnp.zeros((1, 3)), jnp.array([[1.0, 0, 0]]), *BOX, near=0.5)
  np.testing.assert_allclose([near[0], far[0]], [0.5, 32.0], rtol=1e-6)


def test_render_rays_of_an_opaque_plane():
  """A field that is opaque below z = 0 and red: BEV rays from z = 3 see red at depth 3."""
  def field_fn(feats, pts, dirs):
    del feats, dirs
    density = jnp.where(pts[..., 2] < 0.0, 1e3, 0.0)
    return density, jnp.broadcast_to(jnp.array([1.0, 0.0, 0.0]), pts.shape)
  volume = jnp.zeros((1, 4, 4, 2, 3))
  o, d = bev_rays(jnp.array([[[0.0, 0.0], [5.0, -7.0]]]), 3.0)
  near, far, _ = box_near_far(o, d, *BOX)
  out = jax.jit(lambda v, o, d, n, f: render_rays(field_fn, v, o, d, n, f, 600, *BOX))(
      volume, o, d, near, far)
  np.testing.assert_allclose(out['color'], [[[1, 0, 0], [1, 0, 0]]], atol=1e-4)
  np.testing.assert_allclose(out['depth'], [[3.0, 3.0]], atol=6.0 / 600)
  assert out['weights'].shape == (1, 2, 600)


def test_render_at_given_stratified_samples_is_render_rays():
  """render_at with the bin centres render_rays would draw gives render_rays' outputs (the same
  lookup, field and compositing), on a smooth random field with a background."""
  rng = np.random.default_rng(3)
  volume = jnp.asarray(rng.normal(size=(2, 8, 8, 3, 4)), jnp.float32)

  def field_fn(feats, pts, dirs):
    density = jax.nn.softplus(feats[..., 0] + 0.1 * pts[..., 2])
    return density, jax.nn.sigmoid(feats[..., 1:4] + dirs)
  o = jnp.asarray(rng.uniform(-5, 5, (2, 5, 3)), jnp.float32)
  d = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  near, far, _ = box_near_far(o, d, *BOX, 0.5)
  bg = jnp.array([0.2, 0.3, 0.4])

  @jax.jit
  def both(volume, o, d, near, far):
    ref = render_rays(field_fn, volume, o, d, near, far, 16, *BOX, background=bg)
    t, deltas = jax.vmap(jax.vmap(lambda n, f: render.stratified_samples(None, n, f, 16)))(
        near, far)
    return ref, render.render_at(field_fn, volume, o, d, t, deltas, far, *BOX, background=bg)
  ref, out = both(volume, o, d, near, far)
  for k in ('color', 'depth', 'weights', 't'):
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-6)
  assert float(jnp.std(out['depth'])) > 0.1


if __name__ == '__main__':
  pytest.main([__file__])


def test_field_encodes_the_view_direction_once_per_ray_with_the_dense_of_the_concatenation():
  """dirs [R, 1, 3] (one per ray) and dirs repeated per sample [R, S, 3] give the same outputs,
  and both equal the colour branch written as the Dense of concat([trunk, PE(dir)]) that the
  parameter tree (color_hidden kernel [width + Cd, width // 2]) describes."""
  field = RadianceField(width=16, depth=2, pos_freqs=3, dir_freqs=2, box_min=BOX[0],
                        box_max=BOX[1])
  rng = np.random.default_rng(0)
  r, s, c = 5, 7, 4
  feats = jnp.asarray(rng.normal(size=(r, s, c)), jnp.float32)
  points = jnp.asarray(rng.uniform(-30, 30, (r, s, 3)), jnp.float32)
  dirs = rng.normal(size=(r, 1, 3))
  dirs = jnp.asarray(dirs / np.linalg.norm(dirs, axis=-1, keepdims=True), jnp.float32)

  @jax.jit  # one compilation: the init and both applications
  def init_and_apply(feats, points, dirs):
    params = jax.jit(field.init)(jax.random.key(0), feats, points, dirs)['params']
    return (params, field.apply({'params': params}, feats, points, dirs),
            field.apply({'params': params}, feats, points, jnp.broadcast_to(dirs, (r, s, 3))))

  params, (density, color), per_sample = init_and_apply(feats, points, dirs)
  assert params['color_hidden']['kernel'].shape == (16 + 3 * (1 + 2 * 2), 8)
  assert density.shape == (r, s) and color.shape == (r, s, 3)
  np.testing.assert_allclose(density, per_sample[0], rtol=1e-6)
  np.testing.assert_allclose(color, per_sample[1], rtol=1e-6)
  # The same field written with an explicit concatenation (float64, numpy).
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  f64 = lambda a: np.asarray(a, np.float64)
  lo, hi = np.asarray(BOX[0]), np.asarray(BOX[1])
  # positional_encoding orders [x, sin(all freqs), cos(all freqs)] with freqs major, axes minor.
  pe = lambda v, k: np.concatenate(
      [v, np.sin((2.0 ** np.arange(k) * np.pi)[:, None] * v[..., None, :]).reshape(
          v.shape[:-1] + (-1,)),
       np.cos((2.0 ** np.arange(k) * np.pi)[:, None] * v[..., None, :]).reshape(
           v.shape[:-1] + (-1,))], -1)
  dense = lambda name, v: v @ p[name]['kernel'] + p[name]['bias']
  x = np.concatenate([f64(feats), pe(2 * (f64(points) - lo) / (hi - lo) - 1, 3)], -1)
  for i in range(2):
    x = np.maximum(dense(f'trunk_{i}', x), 0)
  d = np.broadcast_to(pe(f64(dirs), 2), (r, s, 15))
  h = np.maximum(dense('color_hidden', np.concatenate([x, d], -1)), 0)
  np.testing.assert_allclose(color, 1 / (1 + np.exp(-dense('color', h))), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(density, np.logaddexp(0, dense('density', x)[..., 0] - 1.0),
                             rtol=1e-5, atol=1e-6)


def test_positional_encoding_matches_float64_sin_cos_with_their_derivatives():
  """The polynomial sin/cos (sincos_pi on 2^k x) against numpy float64 sin(2^k pi x),
  cos(2^k pi x) of the same float32 inputs: within 3e-7 at the field's range and at any
  magnitude (exact argument reduction: jnp.sin of the rounded angle 2^k pi x is off by ~1e-5
  at |x| = 1 and ~1e-2 at |x| = 1000), in the [x, sin (freqs major), cos] order; gradients
  within 1e-5 relative of the analytic derivatives; bf16 inputs come back in bf16."""
  rng = np.random.default_rng(0)
  k = 6
  encode = jax.jit(render.positional_encoding, static_argnums=1)
  scales = 2.0 ** np.arange(k) * np.pi
  for amp in (1.0, 1000.0):
    x = rng.uniform(-amp, amp, (4096, 3)).astype(np.float32)
    angle = (scales[:, None] * np.float64(x)[:, None, :]).reshape(len(x), -1)
    want = np.concatenate([x, np.sin(angle), np.cos(angle)], -1)
    got = np.asarray(encode(jnp.asarray(x), k), np.float64)
    assert got.shape == (4096, 3 * (1 + 2 * k)) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
  # Integers and half-integers, where the reduction switches branch and sign.
  edges = np.arange(-8, 8.5, 0.5, dtype=np.float32)[:, None]
  got = np.asarray(encode(jnp.asarray(edges), 1))
  np.testing.assert_allclose(got[:, 1], np.sin(np.pi * np.float64(edges[:, 0])), atol=2e-7)
  np.testing.assert_allclose(got[:, 2], np.cos(np.pi * np.float64(edges[:, 0])), atol=2e-7)
  # d/dx of sum_j w_j PE_j(x) against the analytic derivative, per input coordinate.
  x = rng.uniform(-1, 1, (256, 3)).astype(np.float32)
  w = rng.normal(size=(256, 3 * (1 + 2 * k))).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(render.positional_encoding(x, k) * w)))(x)
  angle = scales[:, None] * np.float64(x)[:, None, :]                          # [N, F, 3]
  w64 = np.float64(w)
  ws, wc = w64[:, 3:3 + 3 * k].reshape(-1, k, 3), w64[:, 3 + 3 * k:].reshape(-1, k, 3)
  want = w64[:, :3] + np.sum(scales[:, None] * (ws * np.cos(angle) - wc * np.sin(angle)), 1)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-4)
  x16 = jnp.asarray(x, jnp.bfloat16)
  half = encode(x16, k)
  assert half.dtype == jnp.bfloat16   # computed in float32 from the bf16 values, then rounded
  np.testing.assert_allclose(np.asarray(half, np.float32), encode(x16.astype(jnp.float32), k),
                             atol=4e-3)


def _trilinear_by_autodiff(volume, points, box_min, box_max):
  """The lookup as plain gathers (autodiff gives the gradients): the reference for the
  hand-written backward pass of render.trilinear_interpolate."""
  shape = jnp.array(volume.shape[:3])
  lo, hi = jnp.asarray(box_min), jnp.asarray(box_max)
  g = jnp.clip((points - lo) / (hi - lo) * shape - 0.5, 0.0, shape - 1.0)
  i0 = jnp.clip(jnp.floor(g).astype(jnp.int32), 0, jnp.maximum(shape - 2, 0))
  i1, f = jnp.minimum(i0 + 1, shape - 1), g - i0
  out = 0.0
  for corner in np.ndindex(2, 2, 2):
    i = jnp.where(jnp.array(corner), i1, i0)
    w = jnp.prod(jnp.where(jnp.array(corner), f, 1 - f), -1)
    out = out + w[:, None] * volume[i[:, 0], i[:, 1], i[:, 2]]
  return out


@pytest.mark.parametrize('shape', [(8, 6, 3), (8, 1, 3), (2, 5, 1)])
def test_trilinear_gradients_match_autodiff_of_the_gathers(shape):
  """Values, volume gradient (one scatter of all blocks) and point gradient (through the
  weights; points outside the box are clamped, so theirs is 0 on the clamped axes) against
  autodiff of the plain 8-gather lookup, size-1 axes included; under vmap over a batch of
  volumes as the renderer calls it; a bf16 volume keeps its dtype."""
  rng = np.random.default_rng(0)
  volume = jnp.asarray(rng.normal(size=(2, *shape, 5)), jnp.float32)
  points = rng.uniform(-31, 31, (2, 200, 3)) * np.array([1, 1, 0.09])
  points[:, :10] *= 2.0                                   # some outside the box in x and y
  points = jnp.asarray(points, jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 200, 5)), jnp.float32)

  def grads(fn):
    def loss(v, p):
      out = jax.vmap(lambda v, p: fn(v, p, *BOX))(v, p)
      return jnp.sum(out * cot), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(volume, points)

  ((loss, values), (dv, dp)), ((loss_ref, values_ref), (dv_ref, dp_ref)) = (
      grads(render.trilinear_interpolate), grads(_trilinear_by_autodiff))
  np.testing.assert_allclose(values, values_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(dv, dv_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp, dp_ref, rtol=1e-4, atol=1e-5)
  assert np.count_nonzero(np.asarray(dv)) > 0
  assert np.count_nonzero(np.asarray(dp)[:, 10:]) > 0
  np.testing.assert_array_equal(np.asarray(dp)[:, :10, :2][np.abs(points[:, :10, :2]) > 32], 0)

  @jax.jit
  def bf16(v):
    grad = jax.grad(lambda v: jnp.sum(render.trilinear_interpolate(v, points[0], *BOX)
                                      .astype(jnp.float32)))
    return trilinear_interpolate(v, points[0], *BOX), grad(v)

  half, d_half = bf16(volume[0].astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  assert d_half.dtype == jnp.bfloat16
