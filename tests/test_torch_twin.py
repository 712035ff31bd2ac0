"""experiments.torch_twin is our renderer's math: same inputs and weights give the same colour,
depth and gradients (w.r.t. the volume, the field MLP and the background) in torch as in
nsmae_jax.render, for both of the twin's trilinear lookups, with stratified jitter and with bin
centres. torch is optional: without it these tests skip. No timing is asserted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from experiments import torch_twin as tt  # noqa: E402
from experiments import flags as nsflags  # noqa: E402

# Non-cubic volume, a size-1 axis and rays that leave the box: axis order, the border clamp
# and the i0 <= size - 2 rule all show. Perspective origins sit 0.6 up the box; BEV from the top.
SIZES = tt.Sizes(name='tiny', batch=2, perspective_rays=12, bev_rays=6, num_samples=8,
                 volume_shape=(6, 5, 3), channels=4, field_width=16, field_depth=2,
                 pos_freqs=3, dir_freqs=2, box_min=(-4.0, -3.0, -1.0), box_max=(4.0, 5.0, 2.0),
                 near=0.2)
RTOL, ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


@pytest.fixture(scope='module')
def setup():
  inputs = tt.make_inputs(SIZES, seed=3)
  params = tt.init_params(SIZES, seed=3)
  return inputs, params


@pytest.fixture(scope='module')
def ours():
  """Our renderer and its gradient, jitted once for every test here."""
  return jax.jit(tt.jax_render_fn(SIZES)), tt.jax_grad_fn(SIZES)


def _jitter(key):
  """The jitter render_rays draws from `key` (one uniform draw for all rays)."""
  return torch.from_numpy(np.array(jax.random.uniform(
      key, (SIZES.batch, SIZES.rays, SIZES.num_samples), jnp.float32)))


def _jax_args(inputs):
  return [jnp.asarray(inputs[k]) for k in ('volume', 'background', 'origins', 'dirs', 'near')]


@pytest.mark.parametrize('lookup', ['grid_sample', 'gather'])
@pytest.mark.parametrize('stratified', [True, False])
def test_forward_outputs_agree(setup, ours, lookup, stratified):
  inputs, params = setup
  key = jax.random.key(7) if stratified else None
  out = ours[0](params, *_jax_args(inputs), key)
  twin = tt.TorchTwin(SIZES, params, inputs, lookup)
  with torch.no_grad():
    theirs = twin.render(_jitter(key) if stratified else None)
  for name in ('t', 'weights', 'color', 'depth', 'opacity'):
    np.testing.assert_allclose(theirs[name].numpy(), np.asarray(out[name]), rtol=RTOL,
                               atol=ATOL, err_msg=name)
  # Partly transparent: the background and far terms count in colour and depth.
  assert 0.05 < float(np.mean(np.asarray(out['opacity']))) < 0.999


@pytest.mark.parametrize('lookup', ['grid_sample', 'gather'])
def test_gradients_agree(setup, ours, lookup):
  inputs, params = setup
  key = jax.random.key(11)
  j = {k: jnp.asarray(v) for k, v in inputs.items()}
  loss, (g_params, g_volume, g_background) = ours[1](
      params, j['volume'], j['background'], j['origins'], j['dirs'], j['near'], key,
      j['target_color'], j['target_depth'])
  twin = tt.TorchTwin(SIZES, params, inputs, lookup)
  t_loss = twin.step(_jitter(key))
  np.testing.assert_allclose(t_loss.item(), float(loss), rtol=RTOL)
  g = np.asarray(g_volume)
  assert np.count_nonzero(g) > 0.5 * g.size  # the rays reach most of the tiny volume
  np.testing.assert_allclose(twin.t['volume'].grad.numpy(), g, rtol=GRAD_RTOL,
                             atol=GRAD_ATOL * np.abs(g).max())
  np.testing.assert_allclose(twin.t['background'].grad.numpy(), np.asarray(g_background),
                             rtol=GRAD_RTOL, atol=GRAD_ATOL)
  _assert_field_grads_agree(twin.field, g_params)


def _assert_field_grads_agree(torch_field, g_params):
  """The torch field's .grad equals our field's gradients, layer by layer."""
  t_params = tt.torch_grads_as_flax(torch_field)
  for name, layer in g_params.items():
    for leaf in ('kernel', 'bias'):
      ref = np.asarray(layer[leaf])
      np.testing.assert_allclose(t_params[name][leaf], ref, rtol=GRAD_RTOL,
                                 atol=GRAD_ATOL * np.abs(ref).max(), err_msg=f'{name}/{leaf}')


def test_sizes_from_the_shipped_configs():
  demo = tt.sizes_from_config(nsflags.config_from_flagfile(
      tt.FULL_FLAGS.replace('full.flags', 'demo.flags')))
  assert (demo.rays, demo.num_samples, demo.volume_shape, demo.channels, demo.field_width,
          demo.field_depth) == (1536, 32, (32, 32, 6), 32, 64, 2)
  full = tt.sizes_from_config(nsflags.config_from_flagfile(tt.FULL_FLAGS))
  assert (full.batch, full.rays, full.num_samples, full.volume_shape, full.channels,
          full.field_width, full.field_depth) == (2, 8192, 64, (100, 100, 8), 64, 128, 3)


@pytest.mark.slow
def test_speedup_alone_times_each_side_in_its_own_process():
  r = tt.speedup_alone(SIZES, repeats=2)
  assert r['jax_alone_seconds'] > 0 and r['torch_alone_seconds'] > 0
  assert r['renderer_speedup_vs_torch_alone'] == pytest.approx(
      r['torch_alone_seconds'] / r['jax_alone_seconds'])


@pytest.mark.slow
def test_benchmark_torch_speedup_at_given_sizes():
  """benchmark.torch_speedup takes Sizes (how it times full.flags' renderer): both protocols'
  ratios, consistent with their times, at those sizes."""
  from experiments import benchmark  # pylint: disable=import-outside-toplevel
  r = benchmark.torch_speedup(SIZES, repeats=1, warmup=2)
  assert r['rays'] == SIZES.batch * SIZES.rays and r['repeats'] == 1 and r['warmup'] == 2
  assert r['renderer_speedup_vs_torch'] == pytest.approx(r['torch_seconds'] / r['jax_seconds'])
  assert r['renderer_speedup_vs_torch_alone'] == pytest.approx(
      r['torch_alone_seconds'] / r['jax_alone_seconds'])


def test_speedup_times_the_last_call_of_each_block(monkeypatch):
  """speedup's protocol: per round each side runs 1 + warmup calls in a row; the first is the
  after-switch time, the last the timed one (fake calls that sleep by their position in the
  block: 3, 2, 1 units)."""
  import time  # pylint: disable=import-outside-toplevel
  calls = {'jax': 0, 'grid_sample': 0}

  def fake(kind, unit, offset):
    def call():
      calls[kind] += 1
      position = (calls[kind] - 1 - offset) % 3   # warmup=2: blocks of 3
      time.sleep(unit * (3 - position))
    return call

  # ours is called once more, before the rounds (the compile call): offset 1
  monkeypatch.setattr(tt, '_jax_call', lambda *a: fake('jax', 0.05, 1))
  twin = type('FakeTwin', (), {'step': staticmethod(fake('grid_sample', 0.1, 0))})
  monkeypatch.setattr(tt, 'TorchTwin', lambda *a: twin())
  r = tt.speedup(SIZES, repeats=2, lookups=('grid_sample',), warmup=2)
  assert calls == {'jax': 1 + 2 * 3, 'grid_sample': 2 * 3}
  # sleep may overrun, never underrun: each time lies in [its units, + 0.04 s)
  for key, want in (('jax_seconds', 0.05), ('jax_after_switch_seconds', 0.15),
                    ('torch_seconds', 0.1), ('torch_after_switch_seconds', 0.3)):
    assert want <= r[key] < want + 0.04, (key, r[key])
  assert r['warmup'] == 2 and r['renderer_speedup_vs_torch'] == pytest.approx(2.0, rel=0.4)
  with pytest.raises(ValueError, match='warmup'):
    tt.speedup(SIZES, repeats=1, warmup=0)


def test_field_alone_gradients_agree(setup):
  """field_speedup times the same math on both sides: the torch field alone (direction repeated
  per sample) gives our field's gradients w.r.t. its params and the features."""
  _, params = setup
  fin = tt.make_field_inputs(SIZES, seed=5)
  g_params, g_features = tt.jax_field_grad_fn(SIZES)(
      params, {k: jnp.asarray(v) for k, v in fin.items()})
  twin = tt.TorchFieldTwin(SIZES, params, fin)
  twin.step()
  ref = np.asarray(g_features)
  assert ref.shape == fin['features'].shape and np.abs(ref).max() > 0
  np.testing.assert_allclose(twin.features.grad.numpy().reshape(ref.shape), ref,
                             rtol=GRAD_RTOL, atol=GRAD_ATOL * np.abs(ref).max())
  _assert_field_grads_agree(twin.field, g_params)
  r = tt.field_speedup(SIZES, repeats=1, warmup=1)
  assert r['jax_field_seconds'] > 0 and r['torch_field_seconds'] > 0
  assert r['field_speedup_vs_torch'] == pytest.approx(
      r['torch_field_seconds'] / r['jax_field_seconds'])
