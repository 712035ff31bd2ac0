"""Camera encoder: a ViT over each camera with MAE patch masking.

The encoder sees only the visible tokens (static shapes: a random permutation per camera and a
gather of the first `n_keep`), so its cost shrinks with the mask ratio; learned mask tokens then
refill the grid, and a small conv neck turns the grid into a feature map per camera.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.models.conv import Conv
from nsmae_jax.models.dense import Dense
from nsmae_jax.models.norm import LayerNorm


def num_visible(num_tokens: int, ratio: float) -> int:
  """Tokens kept per camera: T - round(ratio * T), at least 1."""
  return max(1, num_tokens - int(round(ratio * num_tokens)))


def random_keep(key: jax.Array, shape: tuple[int, ...], num_tokens: int,
                n_keep: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """MAE token selection.

  Args:
    key: PRNGKey; shape: leading dims (e.g. (B, 6)); num_tokens: T; n_keep: visible count.

  Returns:
    keep [*shape, n_keep] int32 indices of the visible tokens (ascending), masked
    [*shape, T] bool (True = masked).
  """
  noise = jax.random.uniform(key, shape + (num_tokens,))
  keep = jnp.sort(jnp.argsort(noise, axis=-1)[..., :n_keep], axis=-1)
  masked = jnp.ones(shape + (num_tokens,), bool)
  masked = jnp.put_along_axis(masked, keep, False, axis=-1, inplace=False)
  return keep, masked


class Block(nn.Module):
  """Pre-norm transformer block."""
  heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[N, T, D] -> [N, T, D]."""
    d = x.shape[-1]
    y = LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(y, y)
    y = LayerNorm(dtype=self.dtype)(x)
    y = Dense(d * self.mlp_ratio, dtype=self.dtype)(y)
    return x + Dense(d, dtype=self.dtype)(nn.gelu(y))


class ViTEncoder(nn.Module):
  """Images of every camera -> per-camera feature maps at patch resolution.

  Attributes:
    patch: patch edge (px); width/depth/heads/mlp_ratio: transformer sizes; out_channels:
    channels of the output feature maps; mask_ratio: MAE fraction masked when mask=True.
  """
  patch: int
  width: int
  depth: int
  heads: int
  mlp_ratio: int
  out_channels: int
  mask_ratio: float
  dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each block in the backward pass (same params)

  @nn.compact
  def __call__(self, images: jnp.ndarray, mask: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """images [B, K, H, W, 3] in [0, 1] -> features [B, K, H/p, W/p, out_channels] and the
    masked patches [B, K, H/p, W/p] bool. Uses the 'mask' rng when masking."""
    b, k, h, w, _ = images.shape
    gh, gw = h // self.patch, w // self.patch
    t = gh * gw
    x = Conv(self.width, (self.patch, self.patch), strides=self.patch, padding='VALID',
             dtype=self.dtype, name='patch_embed')(
                    (images.reshape(b * k, h, w, 3) - 0.5).astype(self.dtype))
    x = x.reshape(b, k, t, self.width)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (t, self.width))
    cam = self.param('camera_embed', nn.initializers.normal(0.02), (k, self.width))
    embed = (pos[None] + cam[:, None]).astype(self.dtype)           # [K, T, D]
    x = x + embed
    n_keep = num_visible(t, self.mask_ratio) if mask else t
    if n_keep < t:
      keep, masked = random_keep(self.make_rng('mask'), (b, k), t, n_keep)
      x = jnp.take_along_axis(x, keep[..., None], axis=2)          # [B, K, n_keep, D]
    else:
      keep, masked = None, jnp.zeros((b, k, t), bool)
    x = x.reshape(b * k, n_keep, self.width)
    block = nn.remat(Block) if self.remat else Block  # nn.remat keeps the param tree
    for i in range(self.depth):
      x = block(self.heads, self.mlp_ratio, dtype=self.dtype, name=f'block{i}')(x)
    x = LayerNorm(dtype=self.dtype, name='encoder_norm')(x).reshape(b, k, n_keep, self.width)
    # Created unconditionally so that the parameter tree does not depend on `mask`.
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (self.width,))
    if keep is not None:
      full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, k, t, self.width))
      bi = jnp.arange(b)[:, None, None]
      ki = jnp.arange(k)[None, :, None]
      x = full.at[bi, ki, keep].set(x)
    # The refilled grid gets its positions again (as in the MAE decoder) so that the neck can
    # tell mask tokens apart.
    x = (x + embed).reshape(b * k, gh, gw, self.width)
    x = Dense(self.out_channels, dtype=self.dtype, name='neck_proj')(x)
    x = x + Conv(self.out_channels, (3, 3), dtype=self.dtype, name='neck_conv')(nn.gelu(x))
    return x.reshape(b, k, gh, gw, self.out_channels), masked.reshape(b, k, gh, gw)
