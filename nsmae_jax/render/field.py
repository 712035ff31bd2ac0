"""The radiance field: an MLP from [volume feature, encoded point, encoded view direction] to
density and colour (the NS-MAE field head)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nsmae_jax.models.dense import Dense, DenseParts, dense


def positional_encoding(x: jnp.ndarray, num_freqs: int) -> jnp.ndarray:
  """NeRF encoding [x, sin(2^k pi x), cos(2^k pi x)], k < num_freqs.

  Computed by `sincos_pi` on 2^k x (exact products), not by jnp.sin/jnp.cos on 2^k pi x:
  XLA:CPU's sin and cos cost ~3 ns an element on this project's CPUs, 8x its exp, and were
  ~10% of the demo renderer's forward + backward; the polynomial form takes a third of the
  time and is more accurate (no rounding of the angle 2^k pi x before the reduction).

  Args:
    x: [..., D], roughly in [-1, 1] (any magnitude works).

  Returns:
    [..., D * (1 + 2 num_freqs)], x's dtype (computed in at least float32).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  scales = 2.0 ** jnp.arange(num_freqs, dtype=xf.dtype)
  xb = (xf[..., None, :] * scales[:, None]).reshape(x.shape[:-1] + (-1,))
  sin, cos = sincos_pi(xb)
  return jnp.concatenate([xf, sin, cos], axis=-1).astype(x.dtype)


# Taylor coefficients of sin(pi r) / r and cos(pi r) in powers of r^2: on |r| <= 1/2 the first
# omitted terms are below 6e-8 (sin) and 7e-9 (cos), under float32's resolution near 1.
_SIN_PI = tuple((-1) ** k * math.pi ** (2 * k + 1) / math.factorial(2 * k + 1) for k in range(6))
_COS_PI = tuple((-1) ** k * math.pi ** (2 * k) / math.factorial(2 * k) for k in range(7))


def _polynomial(coeffs: tuple[float, ...], z: jnp.ndarray) -> jnp.ndarray:
  acc = jnp.full_like(z, coeffs[-1])
  for c in coeffs[-2::-1]:
    acc = acc * z + c
  return acc


def sincos_pi(y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """sin(pi y), cos(pi y) with only multiplies and adds (vectorises on every backend).

  y = n + r with n = round(y) and r in [-1/2, 1/2] exactly (float subtraction of the nearest
  integer is exact), sin(pi y) = (-1)^n sin(pi r), cos(pi y) = (-1)^n cos(pi r), each by its
  Taylor polynomial. Error < 2e-7 for any float32 y; gradients are the polynomials'
  derivatives (round has none), within the same tolerance of pi cos(pi y), -pi sin(pi y).
  """
  n = jnp.round(y)
  r = y - n
  sign = 1.0 - 2.0 * (n - 2.0 * jnp.floor(0.5 * n))            # (-1)^n
  z = r * r
  return sign * r * _polynomial(_SIN_PI, z), sign * _polynomial(_COS_PI, z)


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
    parts = (features.astype(self.dtype),
             positional_encoding(p, self.pos_freqs).astype(self.dtype))
    if self.depth:
      # nn.Dense of the concatenation (same parameters), whose backward computes the
      # encoding's input gradient only where something asks for it (models.dense.dense_parts).
      x = nn.relu(DenseParts(self.width, dtype=self.dtype, name='trunk_0')(*parts))
    else:
      x = jnp.concatenate(parts, axis=-1)
    for i in range(1, self.depth):
      x = nn.relu(Dense(self.width, dtype=self.dtype, name=f'trunk_{i}')(x))
    # Shifted softplus: starts semi-transparent (~0.3 / m) so early gradients reach every sample.
    density = nn.softplus(Dense(1, dtype=self.dtype, name='density')(x)[..., 0]
                          .astype(jnp.float32) - 1.0)
    d = positional_encoding(dirs, self.dir_freqs).astype(self.dtype)
    h = nn.relu(_ConcatDense(self.width // 2, dtype=self.dtype, name='color_hidden')(x, d))
    color = nn.sigmoid(Dense(3, dtype=self.dtype, name='color')(h).astype(jnp.float32))
    return density, color


class _ConcatDense(nn.Module):
  """nn.Dense of concat([x, d], -1), parameters and initial values identical to it (kernel
  [Cx + Cd, features], bias), computed as (x @ kernel[:Cx] + bias) + d @ kernel[Cx:] so that a
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
    # models.dense.dense for the per-sample part: its kernel gradient avoids XLA:CPU's slow
    # transposed copy of the cotangent (demo train step 198 -> 193 ms, in-process A/B).
    return dense(x, kernel[:cx], bias.astype(self.dtype)) + d @ kernel[cx:]
