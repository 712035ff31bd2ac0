"""models.norm.LayerNorm: flax's LayerNorm (params, values, gradients) with matmul-shaped
scale/bias gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_matches_flax_module, normal
from nsmae_jax.models.norm import LayerNorm, normalize


@pytest.mark.parametrize('shape', [(2, 300, 24), (5, 7)])
def test_layer_norm_matches_flax_in_values_and_gradients(shape):
  ours, ref = LayerNorm(), nn.LayerNorm()
  x = normal(shape, 0) * 3.0 + 1.5
  g = normal(shape, 1)
  params = jax.jit(ref.init)(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, jax.jit(ours.init)(jax.random.key(2), x)) == \
      jax.tree.map(jnp.shape, params)
  # Non-trivial scale and bias, the same for both (our module reads flax's tree as it is).
  params = jax.tree.map(lambda p: p + 0.3 * normal(p.shape, 3), params)
  assert_matches_flax_module(ours, ref, params, x, g, ('scale', 'bias'))


def test_layer_norm_under_vmap_and_bf16():
  """Per-example vmap with shared params (the train step's form) sums the param cotangents over
  examples; bf16 compute keeps float32 params and returns bf16."""
  x = normal((3, 40, 16), 0)
  ours, ref = LayerNorm(dtype=jnp.bfloat16), nn.LayerNorm(dtype=jnp.bfloat16)
  params = jax.jit(ref.init)(jax.random.key(1), x[0])

  def grads(m):
    per = lambda p, xi: jnp.sum(m.apply(p, xi).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(per, in_axes=(None, 0))(p, x))))(params)

  out = ours.apply(params, x[0])
  assert out.dtype == jnp.bfloat16
  d, d_ref = grads(ours), grads(ref)
  for k in ('scale', 'bias'):
    assert d['params'][k].dtype == jnp.float32
    np.testing.assert_allclose(d['params'][k], d_ref['params'][k], rtol=3e-2, atol=3e-2)


def test_normalize_of_constant_rows_and_bf16_input_matches_flax():
  """Rows whose variance is 0 (flax clips E[x^2] - E[x]^2 at 0) and a bf16 input with float32
  statistics: values and input gradients as flax's normalisation."""
  x = normal((4, 33), 0) * 2.0 + 0.7
  x = x.at[1].set(1.5).at[3].set(-0.25)
  g = normal(x.shape, 1)
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    ours_fn = lambda v, d=dtype: normalize(v, 1e-6, d)
    ref_fn = lambda v, d=dtype: nn.LayerNorm(use_scale=False, use_bias=False, dtype=d).apply(
        {}, v)
    def value_and_vjp(fn, v, cot):
      y, vjp = jax.vjp(fn, v)
      return y, vjp(cot)[0]

    (y, dx), (y_ref, dx_ref) = jax.jit(lambda v, cot: (value_and_vjp(ours_fn, v, cot),
                                                       value_and_vjp(ref_fn, v, cot)))(
        xd, g.astype(dtype))
    assert y.dtype == y_ref.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    assert dx.dtype == dtype
    np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), rtol=tol, atol=tol)
