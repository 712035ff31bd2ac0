"""Volume compositing along one ray (or any leading batch of rays).

Quadrature of the volume-rendering integral with piecewise-constant density per interval:
alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j), w_i = T_i alpha_i.
"""

from __future__ import annotations

import jax.numpy as jnp


def composite(density: jnp.ndarray, color: jnp.ndarray, t: jnp.ndarray, deltas: jnp.ndarray,
              far: jnp.ndarray | None = None,
              background: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Composites samples along rays.

  Args:
    density: [..., S] non-negative density (1/m) of each sample's interval.
    color: [..., S, 3] colour of each sample.
    t: [..., S] distance of each sample along the (unit-direction) ray (m).
    deltas: [..., S] length of each sample's interval (m).
    far: [...] far bound of the ray; the transmittance left after the last sample is placed
      there in the expected depth (so depth stays in [near, far]). None: left out.
    background: [3] (or broadcastable to [..., 3]) colour met by the light that leaves the
      last sample: color gains T_S * background. None: black.

  Returns:
    dict with weights [..., S], color [..., 3] (sum w c + T_S background), depth [...]
    (sum w t + T_S far), opacity [...] (sum w = 1 - T_S), transmittance [..., S] (T_i, the
    light reaching sample i).
  """
  tau = density * deltas                                       # [..., S] optical depth
  # T_i = exp(-sum_{j<i} tau_j): an exclusive cumulative sum; exp of a sum is more accurate
  # than a product of (1 - alpha) terms and has the same gradient structure.
  cum = jnp.cumsum(tau, axis=-1)
  trans = jnp.exp(-jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1))
  alpha = 1.0 - jnp.exp(-tau)
  weights = trans * alpha                                      # [..., S]
  opacity = jnp.sum(weights, axis=-1)
  depth = jnp.sum(weights * t, axis=-1)
  if far is not None:
    depth = depth + jnp.exp(-cum[..., -1]) * far
  # sum_i w_i c_i per channel as minor-axis sums: the same sum written over the S axis of
  # [..., S, 3] is a non-minor reduction that XLA:CPU (jax 0.10) hands to a YNNPACK reduce
  # ~10x (forward + backward, 1024 x 32) to ~60x (4096 x 64) slower.
  rgb = jnp.stack([jnp.sum(weights * color[..., k], axis=-1) for k in range(color.shape[-1])],
                  axis=-1)
  if background is not None:
    rgb = rgb + jnp.exp(-cum[..., -1:]) * background
  return dict(weights=weights, color=rgb, depth=depth, opacity=opacity, transmittance=trans)
