"""models.dense.Dense: flax's nn.Dense (params, initial values, outputs, gradients) with a
hand-written backward pass."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_flax_module, normal
from nsmae_jax.models.dense import Dense


# (2, 2**17, 3): 2**18 rows, the bias gradient as a reduce (_REDUCE_BIAS_ROWS)
@pytest.mark.parametrize('shape,features', [((2, 300, 24), 16), ((4, 1, 6, 9), 1),
                                            ((2, 2**17, 3), 2)])
def test_dense_matches_flax_in_init_values_and_gradients(shape, features):
  ours, ref = Dense(features), nn.Dense(features)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape) * 2.0 + 0.5, jnp.float32)
  g = jnp.asarray(rng.normal(size=shape[:-1] + (features,)), jnp.float32)
  params, ours_init = jax.jit(lambda k, x: (ref.init(k, x), ours.init(k, x)))(
      jax.random.key(2), x)
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(ours_init['params'][k], params['params'][k])
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  dp = assert_matches_flax_module(ours, ref, params, x, g, ('kernel', 'bias'))
  for k in ('kernel', 'bias'):
    assert float(jnp.max(jnp.abs(dp['params'][k]))) > 0


def test_dense_keeps_auto_names_dtypes_and_vmaps():
  """Auto-named like nn.Dense inside a parent (checkpoint paths), bf16 compute with float32
  params and gradients, and per-example gradients under vmap."""
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dense(4, dtype=jnp.bfloat16)(Dense(8)(x))
  x = jnp.ones((3, 5))
  params = jax.jit(Two().init)(jax.random.key(0), x)['params']
  assert sorted(params) == ['Dense_0', 'Dense_1']
  apply = lambda p: Two().apply({'params': p}, x)
  y, grads = jax.jit(lambda p: (apply(p), jax.grad(
      lambda p: jnp.sum(apply(p).astype(jnp.float32)))(p)))(params)
  assert y.dtype == jnp.bfloat16 and y.shape == (3, 4)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(grads))

  m = Dense(2)
  p = jax.jit(m.init)(jax.random.key(1), jnp.ones((1, 3)))
  xs = normal((4, 6, 3), 2)
  loss = lambda p, x: jnp.sum(m.apply(p, x) ** 2)
  per_ex, one = jax.jit(lambda p, xs: (jax.vmap(jax.grad(loss), in_axes=(None, 0))(p, xs),
                                       jax.grad(loss)(p, xs[1])))(p, xs)
  np.testing.assert_allclose(per_ex['params']['kernel'][1], one['params']['kernel'], rtol=1e-5)


def _batched_dots(jaxpr: str) -> list[str]:
  """dot_generals of a jaxpr's text whose batch dimensions are not empty."""
  return re.findall(r'dimension_numbers=\(\(\[[\d, ]*\], \[[\d, ]*\]\), \(\[\d', jaxpr)


def test_fold_example_axes_gives_the_same_values_and_gradients_under_grad_of_vmap():
  """Inside fold_example_axes (the train step's per-example vmap) the vmapped example axis is
  folded into the rows of each Dense and LayerNorm scale/shift: outputs and parameter
  gradients as without it, nested vmaps and per-model (batched) parameters included; outside
  the context nothing changes."""
  from nsmae_jax.models import dense as dense_lib  # pylint: disable=import-outside-toplevel
  from nsmae_jax.models.norm import LayerNorm  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dense(3)(nn.relu(LayerNorm()(Dense(8)(x))))

  m = Net()
  xs = normal((3, 5, 7, 4), 0)  # 3 examples [5, 7, 4]
  params = jax.jit(m.init)(jax.random.key(1), xs[0])['params']
  params = jax.tree.map(lambda p: p + 0.2 * normal(p.shape, 2), params)

  def loss(p):
    per_example = jax.vmap(lambda x: jnp.sum(jnp.sin(m.apply({'params': p}, x))))(xs)
    return jnp.mean(per_example)

  # nested vmap (examples x cameras) and a vmap over parameters (two models) fall back correctly
  def nested(p):
    return jnp.sum(jax.vmap(jax.vmap(lambda x: m.apply({'params': p}, x)))(xs) ** 2)

  two = jax.tree.map(lambda p: jnp.stack([p, 1.5 * p]), params)

  def per_model(ps):
    return jnp.sum(jax.vmap(lambda p: m.apply({'params': p}, xs[0]))(ps) ** 2)

  def everything(p, ps):
    return jax.value_and_grad(loss)(p), jax.grad(nested)(p), jax.grad(per_model)(ps)

  # one compilation each; a new lambda each time, so that the second one is traced in the context
  (ref_val, ref_grad), *refs = jax.jit(lambda p, ps: everything(p, ps))(params, two)
  with dense_lib.fold_example_axes():
    (val, grad), *outs = jax.jit(lambda p, ps: everything(p, ps))(params, two)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  # folded: no dot has a batch dimension (unfolded, the kernel gradients are batched per
  # example), and the column sums (bias, LayerNorm scale and shift) run over all 3 x 35 rows at
  # once: no ones-vector of one example's 35 rows is left.
  assert not _batched_dots(jaxpr)
  assert 'f32[105]' in jaxpr and 'f32[35]' not in jaxpr
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  assert _batched_dots(str(jax.make_jaxpr(jax.grad(loss))(params)))
  for out, ref in zip(outs, refs):
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)
