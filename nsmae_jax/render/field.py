"""The radiance field: an MLP from [volume feature, encoded point, encoded view direction] to
density and colour (the NS-MAE field head)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def positional_encoding(x: jnp.ndarray, num_freqs: int) -> jnp.ndarray:
  """NeRF encoding [x, sin(2^k pi x), cos(2^k pi x)], k < num_freqs.

  Args:
    x: [..., D], roughly in [-1, 1].

  Returns:
    [..., D * (1 + 2 num_freqs)].
  """
  scales = (2.0 ** jnp.arange(num_freqs)) * jnp.pi
  xb = (x[..., None, :] * scales[:, None]).reshape(x.shape[:-1] + (-1,))
  return jnp.concatenate([x, jnp.sin(xb), jnp.cos(xb)], axis=-1)


class RadianceField(nn.Module):
  """density, colour = F(volume feature, PE(point), PE(direction)).

  Attributes:
    width, depth: hidden width and number of hidden layers of the trunk.
    pos_freqs, dir_freqs: positional-encoding frequencies.
    box_min, box_max: the volume bounds; points are normalised to [-1, 1] before encoding.
    dtype: computation dtype (bf16 for half precision).
  """
  width: int
  depth: int
  pos_freqs: int
  dir_freqs: int
  box_min: tuple[float, float, float]
  box_max: tuple[float, float, float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jnp.ndarray, points: jnp.ndarray,
               dirs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """features [..., C], points [..., 3] (LiDAR frame), dirs [..., 3] unit, or with size-1
    axes that broadcast to the points' (e.g. [R, 1, 3] for [R, S, 3] samples: the view
    direction is encoded and projected once per ray) -> density [...] (1/m, >= 0), colour
    [..., 3] in (0, 1)."""
    lo, hi = jnp.asarray(self.box_min), jnp.asarray(self.box_max)
    p = 2.0 * (points - lo) / (hi - lo) - 1.0
    x = jnp.concatenate([features.astype(self.dtype),
                         positional_encoding(p, self.pos_freqs).astype(self.dtype)], axis=-1)
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name=f'trunk_{i}')(x))
    # Shifted softplus: starts semi-transparent (~0.3 / m) so early gradients reach every sample.
    density = nn.softplus(nn.Dense(1, dtype=self.dtype, name='density')(x)[..., 0]
                          .astype(jnp.float32) - 1.0)
    d = positional_encoding(dirs, self.dir_freqs).astype(self.dtype)
    h = nn.relu(_ConcatDense(self.width // 2, dtype=self.dtype, name='color_hidden')(x, d))
    color = nn.sigmoid(nn.Dense(3, dtype=self.dtype, name='color')(h).astype(jnp.float32))
    return density, color


class _ConcatDense(nn.Module):
  """nn.Dense of concat([x, d], -1), parameters and initial values identical to it (kernel
  [Cx + Cd, features], bias), computed as x @ kernel[:Cx] + (d @ kernel[Cx:] + bias) so that a
  d that broadcasts over x's leading axes (one view direction per ray) is multiplied once per
  ray instead of once per sample, and the concatenation is never materialised."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:
    cx = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (cx + d.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    kernel = kernel.astype(self.dtype)
    return x @ kernel[:cx] + (d @ kernel[cx:] + bias.astype(self.dtype))
