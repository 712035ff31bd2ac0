"""nn.Dense (same parameters, names, initial values and forward) with a hand-written backward
pass whose kernel gradient XLA:CPU computes without a slow transposed copy.

Why: for y = x @ kernel, autodiff's kernel cotangent is x^T g, a dot contracting the rows of
both. XLA:CPU (jax 0.10) lays that dot out by transposing g, and fuses g's whole producer chain
(the layer norm, ReLU and max-pool backward of the pillar net, say) into that transposing copy:
a loop that reads every input in column order. In the demo train step the pillar net's two such
copies ([16384, 64] and [16384, 32]) took 15.0 and 6.2 ms of a 243 ms step (2 cores with
AVX-512, jax.profiler trace). Written as (g^T x)^T the dot transposes x instead (an activation
already in memory) and leaves g's chain a plain row-major fusion. The bias gradient is a
ones-vector product (the column sums as a matmul, as in models.norm), or a reduce for very many
rows (_REDUCE_BIAS_ROWS). The arithmetic is the same, only the summation order differs (float32
rounding). In-process A/B of the demo train step, interleaved, 40 steps each: 236.7 -> 200.5 ms
median with every Dense of the model swapped (231.4 -> 207.1 ms for the pillar net's two
alone).

Under vmap a custom_vjp is batched as a whole: its kernel gradient becomes a batched dot per
example (and XLA:CPU adds transposed copies around it), so the train step's per-example vmap
made per-device batch 2 slower than twice batch 1. Inside `fold_example_axes()` (which
steps._per_example enters) `dense` goes through a custom_vmap rule instead: a vmapped example
axis of x is folded into the rows, and the custom_vjp runs once on all of them, unbatched.
Measured, demo train step at per-device batch 2, in-process A/B: 545.5 -> 462.0 ms (same loss).
Batch 4: 1200.8 -> 960.2 ms; batch 1: unchanged (205.3 vs 204.6 ms). Compiled memory of
full.flags at per-device batch 2 (experiments.memory_report, XLA:CPU's memory-minimising
scheduler): 7.0 -> 9.5 GiB in bf16 (its half_precision), 12.6 -> 11.5 GiB in float32. The
bf16 rise is mostly the field's (7.4 GiB with every Dense but the field's folded): XLA:CPU
keeps more float32 copies ([524288, 128], 256 MiB each) of its bf16 activations for the
backward dots; not traced further.
Only inside that context: jax 0.10 cannot differentiate a custom_vmap function outside vmap
(grad(f) and vmap(grad(f)) fail with "Linearization failed"; grad(vmap(f)), the train step's
order, works), so everywhere else `dense` is the custom_vjp alone.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


_FOLDING = threading.local()


def folding_examples() -> bool:
  """Whether tracing is inside `fold_example_axes`."""
  return getattr(_FOLDING, 'on', False)


@contextlib.contextmanager
def fold_example_axes() -> Iterator[None]:
  """While tracing inside this context, the functions made by `fold_examples` (dense, the
  LayerNorm's scale_shift) fold vmapped axes of their input into its rows (see the module
  docstring). For code whose Dense layers run under jax.vmap inside jax.grad, as
  steps._per_example; differentiating a Dense that is not under a vmap fails inside it."""
  previous = folding_examples()
  _FOLDING.on = True
  try:
    yield
  finally:
    _FOLDING.on = previous


@jax.custom_vjp
def _dense(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  return x @ kernel + bias


def _dense_fwd(x, kernel, bias):
  return x @ kernel + bias, (x, kernel)


# From this many rows on the bias gradient is a reduce, below it a ones-vector product. Measured
# (2 cores, AVX-512): on a materialised [1M, 128] cotangent the product (a gemv) takes 78 ms, the
# reduce 20 ms, and the renderer twin at full.flags sizes (1M samples, 128 wide) drops 3683 ->
# 3390 ms (4096 x 64: 406 -> 378 ms); but with the reduce everywhere the demo train step was
# slower (194.8 -> 205.1 ms), probably because XLA fuses the cotangent's producer into the
# reduce (a reduce with its producer fused took 111 ms on the same [1M, 128]; not checked in
# the step's HLO). The demo's largest Dense has 49k rows. float32 only: on a bf16 cotangent the
# reduce (in float32) raised full.flags' compiled memory 9.54 -> 10.30 GiB.
_REDUCE_BIAS_ROWS = 2 ** 18


def _kernel_bias_grads(x, g, kernel, keep_order: bool = False):
  """The kernel and bias gradients of x @ kernel + bias for the cotangent g (any leading axes)."""
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  # (g^T x)^T rather than x^T g: the same sums, but XLA:CPU then transposes x, not g.
  dk = jax.lax.dot_general(g2, x2, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  if keep_order:
    # XLA folds the .T below into the dot and stores x^T g after all (a [k, m] row-major dot); the
    # barrier keeps g^T x (dense_parts says when that pays).
    dk = jax.lax.optimization_barrier(dk)
  dk = dk.T
  if g2.shape[0] >= _REDUCE_BIAS_ROWS and g2.dtype == jnp.float32:
    db = jnp.sum(g2, axis=0, dtype=jnp.float32)
  else:
    db = jnp.dot(jnp.ones((g2.shape[0],), g2.dtype), g2, preferred_element_type=jnp.float32)
  return dk.astype(kernel.dtype), db.astype(kernel.dtype)


def _dense_bwd(res, g):
  x, kernel = res
  dk, db = _kernel_bias_grads(x, g, kernel)
  return (g @ kernel.T).astype(x.dtype), dk, db


_dense.defvjp(_dense_fwd, _dense_bwd)


def example_vmap_rule(fn: Callable[..., jnp.ndarray],
                      examples: Callable[..., jnp.ndarray],
                      enabled: Callable[[], bool] = folding_examples
                      ) -> Callable[..., jnp.ndarray]:
  """fn(x, *params) -> the same function, whose vmap over x (one vmapped axis at the front of
  x, or of each array of a tuple x; parameters not vmapped) is examples(axis_size, x, *params)
  while enabled() is true at trace time (a custom_vmap rule). Parameters that are themselves
  vmapped (a vmap over models), or a tuple x with an array not vmapped, take fn's plain vmap;
  outside enabled() it is fn."""
  @jax.custom_batching.custom_vmap
  def ruled(x, *params):
    return fn(x, *params)

  @ruled.def_vmap
  def _rule(axis_size, in_batched, x, *params):  # vmapped axes arrive at the front
    # x may be a tuple of arrays (dense_parts): folded only when every one is vmapped.
    if any(in_batched[1:]) or not all(jax.tree.leaves(in_batched[0])):
      axes = jax.tree.map(lambda b: 0 if b else None, tuple(in_batched))
      return jax.vmap(fn, in_axes=axes)(x, *params), True
    return examples(axis_size, x, *params), True

  @functools.wraps(fn)
  def call(x, *params):
    return (ruled if enabled() else fn)(x, *params)
  return call


def fold_examples(fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
  """fn(x, *params) -> y, with x [..., C] whose leading axes are independent rows (a Dense, a
  LayerNorm's scale and shift) -> the same function, which inside `fold_example_axes` folds a
  vmapped axis of x into those rows and calls fn once, unbatched (example_vmap_rule)."""
  return example_vmap_rule(fn, lambda axis_size, x, *params: fn(x, *params))


dense = fold_examples(_dense)
dense.__doc__ = """x [..., Cin] @ kernel [Cin, Cout] + bias [Cout], with the hand-written backward
pass; folded over vmapped examples inside fold_example_axes."""


class Dense(nn.Module):
  """nn.Dense over the last axis with its defaults: 'kernel' [Cin, features] (lecun_normal),
  'bias' [features] (zeros) in param_dtype, computed in `dtype` (None: the promoted type of
  the input and the kernel). Named Dense so that auto-named instances (Dense_0, ...) keep
  checkpoints' paths."""
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    return dense(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_parts(widths: tuple[int, ...], parts: tuple[jnp.ndarray, ...], kernel: jnp.ndarray,
                 bias: jnp.ndarray) -> jnp.ndarray:
  del widths
  return jnp.concatenate(parts, axis=-1) @ kernel + bias


def _dense_parts_fwd(widths, parts, kernel, bias):
  del widths
  x = jnp.concatenate(parts, axis=-1)
  return x @ kernel + bias, (x, kernel)


def _dense_parts_bwd(widths, res, g):
  x, kernel = res
  dk, db = _kernel_bias_grads(x, g, kernel, keep_order=True)
  starts = np.cumsum((0,) + widths[:-1])
  # One input-gradient dot per part: a part that needs no gradient (the field's positional
  # encoding) leaves its dot dead for XLA to drop, where the slice of one [.., sum(widths)] dot
  # is not pushed into it.
  dparts = tuple((g @ kernel[s:s + w].T).astype(x.dtype) for s, w in zip(starts, widths))
  return dparts, dk, db


_dense_parts.defvjp(_dense_parts_fwd, _dense_parts_bwd)


def dense_parts(parts, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """concatenate(parts, -1) @ kernel + bias: a Dense on inputs that come in parts (the field's
  volume features and positional encoding), each part [..., Ci] with the same leading axes.

  Same forward and gradients as `dense` on the concatenation, with two differences in the
  backward pass, both measured on the renderer's first layer (49152 samples x (32 + 39)
  columns -> 64, forward + backward of the torch twin's renderer, 2 CPU cores of an AMD EPYC
  with AVX2, in-process A/B, 40 rounds): (1) each part's input gradient is its own dot, so a part
  without one costs nothing (the 71-column input gradient was one [49152, 64] x [64, 71] dot
  and a slice): 129.4 -> 123.6 ms; (2) the kernel gradient is kept as (g^T x)^T, which XLA
  otherwise turns back into x^T g (that dot alone: 13.6 -> 7.9 ms at these shapes): 129.4 ->
  122.5 ms; both: 129.4 -> 116.3 ms. Elsewhere (64-column inputs) the kept order was no faster,
  so `dense` leaves the order to XLA. Folded over vmapped examples inside fold_example_axes
  (every part vmapped) like `dense`.
  """
  parts = tuple(parts)
  widths = tuple(int(p.shape[-1]) for p in parts)
  return fold_examples(lambda xs, k, b: _dense_parts(widths, xs, k, b))(parts, kernel, bias)


class DenseParts(nn.Module):
  """nn.Dense of concatenate(parts, -1), its parameters identical (kernel [sum Ci, features],
  bias [features]; same names, shapes, initial values, so checkpoints carry over), computed by
  `dense_parts` (the concatenation is made once, for the forward dot and the kernel
  gradient)."""
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, *parts: jnp.ndarray) -> jnp.ndarray:
    width = sum(p.shape[-1] for p in parts)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (width, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(*parts, kernel)
    return dense_parts([p.astype(dtype) for p in parts], kernel.astype(dtype),
                       bias.astype(dtype))
