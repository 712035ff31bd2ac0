"""Fusion of the LiDAR BEV features and the lifted camera volume (either may be absent).

The layers that read a modality's features (fuse0, bev_conv) keep one kernel per input and
convolve the channel concatenation of the present inputs with the concatenation of their kernels:
for the joint model this is exactly one convolution over the concatenated inputs (the paper's
fusion, same FLOPs), and a single-modality model is the same tree minus the absent input's
leaves, so its fusion restores leaf for leaf from a joint pre-training checkpoint. Why not zeros
for the absent input: a model fine-tuned on zeros learns that constant (through the absent
branch's biases and norms) and the missing sensor is faked instead of absent.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MODALITIES = ('camera', 'lidar')


def _conv3x3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """'SAME' 3x3x3 convolution as one im2col matmul: x [B, X, Y, Z, Cin], kernel
  [3, 3, 3, Cin, Cout] -> [B, X, Y, Z, Cout]."""
  _, nx, ny, nz, cin = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + nx, j:j + ny, k:k + nz]
                          for i in range(3) for j in range(3) for k in range(3)], axis=-1)
  return cols @ kernel.reshape(27 * cin, kernel.shape[-1])


def _conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """'SAME' 3x3 convolution (as flax's nn.Conv): x [B, X, Y, Cin], kernel [3, 3, Cin, Cout]."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv3x3x3(nn.Module):
  """3x3x3 'SAME' convolution as one im2col matmul: XLA:CPU's native 3D convolution (and its
  gradient) runs at a few GFLOP/s, a [voxels, 27 Cin] x [27 Cin, Cout] matmul near peak."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, X, Y, Z, Cin] -> [B, X, Y, Z, features]."""
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return _conv3x3x3(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class SplitInputConv(nn.Module):
  """A 3x3 (ndim 2) or 3x3x3 (ndim 3) 'SAME' convolution of the channel concatenation of named
  inputs, with one kernel per input (`<name>_kernel` [3, .., 3, Cin_name, features]) and one
  bias. Each kernel is drawn as its rows of a lecun_normal kernel of the concatenated fan-in, so
  the joint layer starts as a plain convolution over the concatenated inputs would."""
  features: int
  ndim: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """inputs {name: [B, X, Y(, Z), Cin_name]} (sorted by name) -> [B, X, Y(, Z), features]."""
    names = sorted(inputs)
    total = sum(inputs[n].shape[-1] for n in names)
    kernels = []
    for n in names:
      cin = inputs[n].shape[-1]
      init = nn.initializers.variance_scaling(cin / total, 'fan_in', 'truncated_normal')
      kernels.append(self.param(f'{n}_kernel', init, (3,) * self.ndim + (cin, self.features)))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x = jnp.concatenate([inputs[n].astype(self.dtype) for n in names], axis=-1)
    kernel = jnp.concatenate(kernels, axis=-2).astype(self.dtype)
    conv = _conv3x3x3 if self.ndim == 3 else _conv3x3
    return conv(x, kernel) + bias.astype(self.dtype)


class Fusion(nn.Module):
  """LiDAR BEV [B, X, Y, Cb] is lifted to [B, X, Y, Z, Cv] by a learned per-height projection,
  concatenated with the camera volume and fused by two 3x3x3 convolutions (im2col); the fused
  volume is also collapsed over z (with the LiDAR BEV) into a BEV map for downstream heads.

  `modalities` (a subset of MODALITIES) says which inputs exist: an absent one has no
  parameters (no height_lift without LiDAR, no fuse0/camera_kernel without cameras) and must be
  passed as None.
  """
  volume_channels: int
  bev_channels: int
  z_cells: int
  modalities: tuple[str, ...] = MODALITIES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, lidar_bev: jnp.ndarray | None,
               camera_volume: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """lidar_bev [B, X, Y, Cb] or None, camera_volume [B, X, Y, Z, Cv] or None (LiDAR frame)
    -> volume [B, X, Y, Z, volume_channels], bev [B, X, Y, bev_channels]."""
    given = tuple(m for m, a in (('camera', camera_volume), ('lidar', lidar_bev))
                  if a is not None)
    if given != tuple(sorted(self.modalities)):
      raise ValueError(f'Fusion built for {self.modalities} was given {given}')
    cv = self.volume_channels
    fuse_in = {}
    if lidar_bev is not None:
      b, x, y, _ = lidar_bev.shape
      lidar_vol = nn.Dense(self.z_cells * cv, dtype=self.dtype, name='height_lift')(lidar_bev)
      fuse_in['lidar'] = lidar_vol.reshape(b, x, y, self.z_cells, cv)
    if camera_volume is not None:
      fuse_in['camera'] = camera_volume
    v = SplitInputConv(cv, ndim=3, dtype=self.dtype, name='fuse0')(fuse_in)
    v = nn.relu(nn.LayerNorm(dtype=self.dtype, name='fuse_norm')(v))
    v = v + Conv3x3x3(cv, dtype=self.dtype, name='fuse1')(v)
    b, x, y, z, _ = v.shape
    bev_in = {'volume': v.reshape(b, x, y, z * cv)}
    if lidar_bev is not None:
      bev_in['lidar'] = lidar_bev
    bev = nn.relu(SplitInputConv(self.bev_channels, ndim=2, dtype=self.dtype,
                                 name='bev_conv')(bev_in))
    return v, bev
