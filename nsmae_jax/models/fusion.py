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
import jax.numpy as jnp

from nsmae_jax.models.conv import conv_general_dilated
from nsmae_jax.models.dense import Dense
from nsmae_jax.models.norm import LayerNorm

MODALITIES = ('camera', 'lidar')


def _conv3x3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """'SAME' 3x3x3 convolution as one 3x3 2D convolution over (X, Y): x [B, X, Y, Z, Cin],
  kernel [3, 3, 3, Cin, Cout] -> [B, X, Y, Z, Cout].

  The three z-neighbours of every voxel are stacked on channels ([B, X, Y, Z, 3 Cin]), z joins
  the batch, and the kernel reshaped to [3, 3, 3 Cin, Cout] (the same layout: z, then Cin,
  minor) is applied by the backend's 2D convolution. Only the z-taps are copied (3x the input,
  not the 27x of a full im2col matmul, which this replaced: the paper setting's compiled step
  at per-device batch 2 needs 9.4 GiB instead of 14.7 (experiments.memory_report, remat on).
  Speed, forward + backward on 2 CPU cores: the demo benchmark's fusion part (both 3D convs
  and the BEV conv) took 40.6 ms on idle cores against 149.8 ms with the im2col; alone, the
  paper's [1, 100, 100, 8, 128] -> 64 conv was about even with it (loaded cores); XLA's
  native 3D convolution was slower than either at every size tried (1.7-9x).
  """
  b, nx, ny, nz, cin = x.shape
  xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1), (0, 0)))
  taps = jnp.concatenate([xp[:, :, :, k:k + nz] for k in range(3)], axis=-1)
  taps = taps.transpose(0, 3, 1, 2, 4).reshape(b * nz, nx, ny, 3 * cin)
  y = _conv3x3(taps, kernel.reshape(3, 3, 3 * cin, kernel.shape[-1]))
  return y.reshape(b, nz, nx, ny, -1).transpose(0, 2, 3, 1, 4)


def _conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """'SAME' 3x3 convolution (as flax's nn.Conv): x [B, X, Y, Cin], kernel [3, 3, Cin, Cout]."""
  return conv_general_dilated(x, kernel, (1, 1), 'SAME',
                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv3x3x3(nn.Module):
  """3x3x3 'SAME' convolution (_conv3x3x3: z-taps on channels, one 2D convolution): XLA:CPU's
  native 3D convolution (and its gradient) runs at a few GFLOP/s."""
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
  concatenated with the camera volume and fused by two 3x3x3 convolutions; the fused
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
      lidar_vol = Dense(self.z_cells * cv, dtype=self.dtype, name='height_lift')(lidar_bev)
      fuse_in['lidar'] = lidar_vol.reshape(b, x, y, self.z_cells, cv)
    if camera_volume is not None:
      fuse_in['camera'] = camera_volume
    v = SplitInputConv(cv, ndim=3, dtype=self.dtype, name='fuse0')(fuse_in)
    v = nn.relu(LayerNorm(dtype=self.dtype, name='fuse_norm')(v))
    v = v + Conv3x3x3(cv, dtype=self.dtype, name='fuse1')(v)
    b, x, y, z, _ = v.shape
    bev_in = {'volume': v.reshape(b, x, y, z * cv)}
    if lidar_bev is not None:
      bev_in['lidar'] = lidar_bev
    bev = nn.relu(SplitInputConv(self.bev_channels, ndim=2, dtype=self.dtype,
                                 name='bev_conv')(bev_in))
    return v, bev
