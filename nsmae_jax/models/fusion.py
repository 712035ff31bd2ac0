"""Fusion of the LiDAR BEV features and the lifted camera volume."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Conv3x3x3(nn.Module):
  """3x3x3 'SAME' convolution as one im2col matmul: XLA:CPU's native 3D convolution (and its
  gradient) runs at a few GFLOP/s, a [voxels, 27 Cin] x [27 Cin, Cout] matmul near peak."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, X, Y, Z, Cin] -> [B, X, Y, Z, features]."""
    b, nx, ny, nz, cin = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (3, 3, 3, cin, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + nx, j:j + ny, k:k + nz]
                            for i in range(3) for j in range(3) for k in range(3)], axis=-1)
    y = cols @ kernel.reshape(27 * cin, self.features).astype(self.dtype)
    return y + bias.astype(self.dtype)


class Fusion(nn.Module):
  """LiDAR BEV [B, X, Y, Cb] is lifted to [B, X, Y, Z, Cv] by a learned per-height projection,
  concatenated with the camera volume and fused by two 3x3x3 convolutions (im2col); the fused
  volume is also collapsed over z (with the LiDAR BEV) into a BEV map for downstream heads."""
  volume_channels: int
  bev_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, lidar_bev: jnp.ndarray,
               camera_volume: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """-> volume [B, X, Y, Z, volume_channels], bev [B, X, Y, bev_channels] (LiDAR frame)."""
    b, x, y, z, _ = camera_volume.shape
    cv = self.volume_channels
    lidar_vol = nn.Dense(z * cv, dtype=self.dtype, name='height_lift')(lidar_bev)
    lidar_vol = lidar_vol.reshape(b, x, y, z, cv)
    v = jnp.concatenate([lidar_vol, camera_volume.astype(lidar_vol.dtype)], axis=-1)
    v = Conv3x3x3(cv, dtype=self.dtype, name='fuse0')(v)
    v = nn.relu(nn.LayerNorm(dtype=self.dtype, name='fuse_norm')(v))
    v = v + Conv3x3x3(cv, dtype=self.dtype, name='fuse1')(v)
    bev = jnp.concatenate([lidar_bev, v.reshape(b, x, y, z * cv)], axis=-1)
    bev = nn.relu(nn.Conv(self.bev_channels, (3, 3), dtype=self.dtype, name='bev_conv')(bev))
    return v, bev
