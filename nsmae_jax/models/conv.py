"""Convolutions that run one example at a time under the train step's per-example vmap.

Why: XLA:CPU's (jax 0.10) convolution backward grows faster than its batch. The train step vmaps
its loss over the examples of a device (steps._per_example), and vmap batches a convolution
whose kernel is shared by folding the examples into the convolution's batch, so per-device batch
E runs every convolution, forward and backward, at batch E. Measured on 2 cores (AVX-512),
forward + backward of one 3x3 convolution, 64 -> 64 channels, at batch 1 / 2 / 4:

  128 x 128, stride 2: 12.8 / 28.0 / 73.0 ms as one batch; 12.9 / 23.3 / 48.2 ms one by one
  64 x 64, stride 1:    8.2 / 18.8 / 50.6 ms as one batch;  8.4 / 16.1 / 30.0 ms one by one

(128 x 128 at stride 1 grows linearly either way; as `lax.map` over the examples it is 30x
slower: XLA:CPU leaves convolutions inside loops to a slow generic kernel, so the examples are
unrolled.) Inside `models.dense.fold_example_axes()` `conv_general_dilated` goes through a
custom_vmap rule that calls the convolution once per example of the vmapped axis (a Python
loop: the per-device batch is static and small) and stacks the results; the gradients are the
per-example convolutions' own. Everywhere else, and for a vmap over the kernel (a vmap over
models), it is lax.conv_general_dilated. The arithmetic is the same per example.

CPU only (jax.default_backend() at trace time): on GPU/TPU a convolution's batch is what keeps
the device busy, and unrolling a large per-device batch would also lengthen the compile; there
the examples stay folded into the batch (not measured on an accelerator: none was available).

`Conv` is flax's nn.Conv (same parameters, names, initial values) with that convolution.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.models.dense import example_vmap_rule, folding_examples


def unroll_examples(fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
  """fn(x, *params) -> y, x with its own leading batch axis -> the same function, which inside
  `fold_example_axes` on the CPU backend runs a vmapped axis of x one example at a time (a
  Python loop over the axis, stacked; dense.example_vmap_rule)."""
  return example_vmap_rule(
      fn, lambda axis_size, x, *params: jnp.stack([fn(x[i], *params) for i in range(axis_size)]),
      enabled=lambda: folding_examples() and jax.default_backend() == 'cpu')


def _static(value):
  """Padding / strides / dimension numbers as hashable, comparable static arguments."""
  if isinstance(value, list) or type(value) is tuple:  # pylint: disable=unidiomatic-typecheck
    return tuple(_static(v) for v in value)
  return value  # namedtuples (lax.ConvDimensionNumbers) as they are


@functools.lru_cache(maxsize=None)
def _unrolled_conv(**static) -> Callable[..., jnp.ndarray]:
  return unroll_examples(functools.partial(jax.lax.conv_general_dilated, **static))


def conv_general_dilated(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jnp.ndarray:
  """lax.conv_general_dilated (same arguments), run one example at a time under the train
  step's per-example vmap (see the module docstring)."""
  static = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                precision=precision, preferred_element_type=preferred_element_type)
  return _unrolled_conv(**{k: _static(v) for k, v in static.items()})(lhs, rhs)


class Conv(nn.Conv):
  """nn.Conv (same attributes, parameters, names and initial values) whose convolution runs one
  example at a time under the train step's per-example vmap (`conv_general_dilated`). Named
  Conv so that auto-named instances (Conv_0, ...) keep checkpoints' paths."""
  conv_general_dilated: Any = conv_general_dilated
