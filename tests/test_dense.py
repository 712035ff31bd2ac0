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
from nsmae_jax.models.dense import Dense, DenseParts


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


class _ConcatThenDense(nn.Module):
  """The reference for DenseParts: flax's nn.Dense on the concatenated parts."""
  features: int

  @nn.compact
  def __call__(self, *parts):
    return nn.Dense(self.features, name='layer')(jnp.concatenate(parts, axis=-1))


class _Parts(nn.Module):
  features: int

  @nn.compact
  def __call__(self, *parts):
    return DenseParts(self.features, name='layer')(*parts)


def test_dense_parts_is_nn_dense_of_the_concatenation():
  """Same parameters and initial values as nn.Dense on the concatenated parts, the same outputs,
  and the same gradients for every part, the kernel and the bias (leading axes kept)."""
  a, b, g = normal((3, 7, 5), 0), normal((3, 7, 4), 1), normal((3, 7, 6), 2)
  ours, ref = _Parts(6), _ConcatThenDense(6)
  p_ours, p_ref = jax.jit(lambda k: (ours.init(k, a, b), ref.init(k, a, b)))(jax.random.key(4))
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(p_ours['params']['layer'][k], p_ref['params']['layer'][k])
  params = jax.tree.map(lambda p: p + 0.3 * normal(p.shape, 5), p_ref)

  @jax.jit
  def both(params, a, b):
    loss = lambda m: lambda p, a, b: jnp.sum(jnp.tanh(m.apply(p, a, b)) * g)
    return [(m.apply(params, a, b), jax.grad(loss(m), argnums=(0, 1, 2))(params, a, b))
            for m in (ours, ref)]

  (y, grads), (y_ref, grads_ref) = both(params, a, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for x, x_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert x.shape == x_ref.shape
    np.testing.assert_allclose(x, x_ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(x))) > 0


def _dot_shapes(hlo: str) -> list[str]:
  """Every dot's result as (logical shape, layout), e.g. 'f32[9,6]{0,1}'; the layout lists the
  dimensions minor to major, so f32[9,6]{0,1} is stored as a row-major [6, 9]."""
  return re.findall(r'= (f32\[[\d,]+\]\{[\d,]*\}) dot\(', hlo)


def test_dense_parts_drops_an_unused_part_gradient_and_keeps_the_kernel_gradient_order():
  """Differentiated w.r.t. the parameters and the first part only, the compiled backward has no
  dot for the second part's input gradient (nn.Dense of the concatenation computes all 9
  columns: checked too), and the kernel gradient is stored as g^T x ([features, columns]), not
  as x^T g, which is what XLA makes of the plain transposed form."""
  a, b = normal((64, 5), 0), normal((64, 4), 1)
  m, ref = _Parts(6), _ConcatThenDense(6)
  params = jax.jit(m.init)(jax.random.key(0), a, b)
  loss = lambda m: lambda p, a: jnp.sum(jnp.tanh(m.apply(p, a, b)))
  shapes = _dot_shapes(jax.jit(jax.grad(loss(m), argnums=(0, 1))).lower(params, a).compile()
                       .as_text())
  ref_shapes = _dot_shapes(jax.jit(jax.grad(loss(ref), argnums=(0, 1))).lower(params, a)
                           .compile().as_text())
  # the reference: one 9-column input gradient, the kernel gradient stored as x^T g
  assert 'f32[64,9]{1,0}' in ref_shapes and 'f32[9,6]{1,0}' in ref_shapes, ref_shapes
  assert not any(s.startswith(('f32[64,9]', 'f32[64,4]')) for s in shapes), shapes
  assert 'f32[64,5]{1,0}' in shapes, shapes
  # g^T x: stored as a row-major [6, 9], whichever way XLA writes the logical shape
  assert {'f32[6,9]{1,0}', 'f32[9,6]{0,1}'} & set(shapes), shapes
  assert 'f32[9,6]{1,0}' not in shapes, shapes


def test_dense_parts_folds_examples_like_dense():
  """Inside fold_example_axes, grad of a per-example vmap: the parts' example axis is folded into
  the rows (no batched dot), with the same values and gradients as outside; a part that is not
  vmapped falls back to the plain vmap, with the right result."""
  from nsmae_jax.models import dense as dense_lib  # pylint: disable=import-outside-toplevel
  m = _Parts(3)
  a, b = normal((4, 5, 2), 0), normal((4, 5, 3), 1)
  params = jax.jit(m.init)(jax.random.key(1), a[0], b[0])
  params = jax.tree.map(lambda p: p + 0.2 * normal(p.shape, 2), params)

  def loss(p, a, b):
    return jnp.mean(jax.vmap(lambda a, b: jnp.sum(jnp.sin(m.apply(p, a, b))))(a, b))

  def shared_b(p, a):  # b is the same for every example: not vmapped
    return jnp.sum(jax.vmap(lambda a: jnp.sin(m.apply(p, a, b[0])))(a))

  both = lambda p, a, b: (jax.value_and_grad(loss, argnums=(0, 1, 2))(p, a, b),
                          jax.grad(shared_b, argnums=(0, 1))(p, a))
  ref = jax.jit(lambda p, a, b: both(p, a, b))(params, a, b)
  with dense_lib.fold_example_axes():
    out = jax.jit(lambda p, a, b: both(p, a, b))(params, a, b)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, a, b))
  assert not _batched_dots(jaxpr)
  assert _batched_dots(str(jax.make_jaxpr(jax.grad(loss))(params, a, b)))
  for x, x_ref in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, x_ref, rtol=2e-5, atol=1e-6)
  # the fallback's gradient against a per-example loop
  per_ex = sum(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, a[i], b[0]))))(params)['params']
               ['layer']['kernel'] for i in range(4))
  np.testing.assert_allclose(out[1][0]['params']['layer']['kernel'], per_ex, rtol=2e-5,
                             atol=1e-6)
