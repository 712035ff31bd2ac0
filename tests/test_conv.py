"""models.conv: flax's nn.Conv (params, names, initial values, outputs, gradients) whose
convolution runs one example at a time under the train step's per-example vmap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helpers import assert_matches_flax_module, normal
from nsmae_jax.models import dense as dense_lib
from nsmae_jax.models.conv import Conv, conv_general_dilated


def test_conv_matches_flax_conv():
  """Parameters bit-equal to nn.Conv's (strided SAME with bias; VALID without); outputs and
  gradients of the strided one as nn.Conv's; auto-names Conv_0, Conv_1."""
  x = normal((2, 9, 8, 5), 0)
  for kw in (dict(features=4, kernel_size=(3, 3), strides=2),
             dict(features=3, kernel_size=(2, 2), strides=2, padding='VALID', use_bias=False)):
    ours, ref = Conv(**kw), nn.Conv(**kw)
    params, ref_params = jax.jit(lambda k, x: (ours.init(k, x), ref.init(k, x)))(
        jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_array_equal(a, b)
  g = normal((2, 5, 4, 4), 2)
  params = jax.jit(Conv(4, (3, 3), strides=2).init)(jax.random.key(1), x)
  assert_matches_flax_module(Conv(4, (3, 3), strides=2), nn.Conv(4, (3, 3), strides=2), params,
                             x, g, ['kernel', 'bias'])

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Conv(2, (1, 1))(Conv(2, (3, 3))(x))

  assert set(jax.eval_shape(Net().init, jax.random.key(0), x)['params']) == {'Conv_0', 'Conv_1'}


def test_unrolled_under_fold_example_axes_gives_the_same_values_and_gradients():
  """Inside fold_example_axes a vmapped example axis runs one example at a time: every
  convolution of the differentiated jaxpr has the per-example batch (2), none the 3 examples'
  (6); values and gradients as without it; a vmap over kernels (two models) falls back."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Conv(3, (3, 3))(nn.relu(Conv(4, (3, 3), strides=2)(x)))

  m = Net()
  xs = normal((3, 2, 8, 8, 5), 0)  # 3 examples [2, 8, 8, 5]
  params = jax.jit(m.init)(jax.random.key(1), xs[0])['params']

  def loss(p):
    return jnp.mean(jax.vmap(lambda x: jnp.sum(jnp.sin(m.apply({'params': p}, x))))(xs))

  def lhs_batches(jaxpr) -> set[int]:
    return {e.invars[0].aval.shape[0] for e in _eqns(jaxpr.jaxpr)
            if e.primitive.name == 'conv_general_dilated'}

  two = jax.tree.map(lambda p: jnp.stack([p, 1.5 * p]), params)

  def per_model(ps):
    return jnp.sum(jax.vmap(lambda p: m.apply({'params': p}, xs[0]))(ps) ** 2)

  def both(p, ps):
    return jax.value_and_grad(loss)(p), jax.grad(per_model)(ps)

  # one compilation each; a new lambda each time, so that the second one is traced in the context
  (ref_val, ref_grad), ref = jax.jit(lambda p, ps: both(p, ps))(params, two)
  assert 6 in lhs_batches(jax.make_jaxpr(jax.grad(loss))(params))   # vmap folds the examples
  with dense_lib.fold_example_axes():
    (val, grad), out = jax.jit(lambda p, ps: both(p, ps))(params, two)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  assert lhs_batches(jaxpr) == {2}
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_general_dilated_is_lax_outside_the_context():
  x = normal((1, 6, 6, 2), 0)
  k = normal((3, 3, 2, 4), 1)
  args = ((2, 2), [(0, 1), (0, 1)])
  kw = dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(conv_general_dilated(x, k, *args, **kw),
                                jax.lax.conv_general_dilated(x, k, *args, **kw))
  np.testing.assert_allclose(jax.grad(lambda k: conv_general_dilated(x, k, *args, **kw).sum())(k),
                             jax.grad(lambda k: jax.lax.conv_general_dilated(
                                 x, k, *args, **kw).sum())(k), rtol=1e-6)


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (custom_vjp, pjit, ...) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _eqns(inner if hasattr(inner, 'eqns') else inner.jaxpr)
