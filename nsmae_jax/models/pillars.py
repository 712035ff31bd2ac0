"""LiDAR pillar encoder (PointPillars-style) with MAE block masking, and its BEV backbone.

Frames: points are in the key frame's LiDAR frame (x right, y forward, z up, m). The pillar
canvas covers [-E, E]^2 with `cells` pillars per side; pillar (i, j) has flat id i * cells + j
and is centred at x = -E + (i + 0.5) s, y = -E + (j + 0.5) s (the DESIGN.md [x, y] indexing).
Points outside the canvas or [z_min, z_max], and padded points, go to a dump id `cells**2` that
every consumer drops: no per-pillar point cap, no dynamic shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.models.conv import Conv
from nsmae_jax.models.dense import Dense
from nsmae_jax.models.norm import LayerNorm

NUM_POINT_FEATURES = 10  # x, y, z, intensity, time lag, 3 offsets to the mean, 2 to the centre


def pillar_ids(points: jnp.ndarray, points_mask: jnp.ndarray, cells: int, half_extent: float,
               z_min: float, z_max: float) -> jnp.ndarray:
  """[..., P, >=3] points, [..., P] mask -> [..., P] int32 pillar ids; `cells**2` = dropped."""
  size = 2.0 * half_extent / cells
  ij = jnp.floor((points[..., :2] + half_extent) / size).astype(jnp.int32)
  inside = (jnp.all((ij >= 0) & (ij < cells), axis=-1) & (points[..., 2] >= z_min)
            & (points[..., 2] <= z_max) & points_mask.astype(bool))
  return jnp.where(inside, ij[..., 0] * cells + ij[..., 1], cells * cells)


def mask_pillars(key: jax.Array, ids: jnp.ndarray, cells: int, ratio: float,
                 block: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """MAE masking in square blocks of block x block pillars: drops round(ratio * n) of the n
  non-empty blocks of each sample.

  Blocks are as large as a fused-volume cell (block = volume_stride): a pillar finer than the
  volume is almost never hidden with all its neighbours in the same volume cell, so pillar-wise
  masking leaves every volume cell partly visible and the reconstruction nearly trivial.

  Args:
    key: PRNGKey; ids: [B, P] pillar ids of a `cells` x `cells` canvas (cells**2 = dropped);
    ratio in [0, 1); block: block edge in pillars (divides cells).

  Returns:
    ids [B, P] with the points of dropped blocks moved to the dump id, and dropped
    [B, cells / block, cells / block] bool (True = dropped), block (i, j) covering pillars
    [i block, (i + 1) block) x [j block, (j + 1) block) (the volume's [x, y] grid).
  """
  num_pillars, nb = cells * cells, cells // block
  num_blocks = nb * nb

  def one(k, pid):
    i, j = pid // cells, pid % cells
    bid = jnp.where(pid < num_pillars, (i // block) * nb + j // block, num_blocks)
    counts = jax.ops.segment_sum(jnp.ones_like(bid), bid, num_blocks + 1)[:num_blocks]
    nonempty = counts > 0
    n_drop = jnp.round(ratio * jnp.sum(nonempty)).astype(jnp.int32)
    # Non-empty blocks get scores in [0, 1), empty ones 2: the first n_drop of a stable sort
    # are a uniformly random subset of the non-empty blocks of exactly that size.
    score = jnp.where(nonempty, jax.random.uniform(k, (num_blocks,)), 2.0)
    order = jnp.argsort(score, stable=True)
    rank = jnp.zeros((num_blocks,), jnp.int32).at[order].set(jnp.arange(num_blocks))
    dropped = rank < n_drop
    dropped_point = jnp.concatenate([dropped, jnp.zeros((1,), bool)])[bid]
    return jnp.where(dropped_point, num_pillars, pid), dropped.reshape(nb, nb)
  return jax.vmap(one)(jax.random.split(key, ids.shape[0]), ids)


def block_to_pillars(dropped: jnp.ndarray, block: int) -> jnp.ndarray:
  """[B, nb, nb] block mask -> [B, (nb block)**2] per-pillar mask (flat pillar ids)."""
  up = jnp.repeat(jnp.repeat(dropped, block, axis=1), block, axis=2)
  return up.reshape(dropped.shape[0], -1)


def point_features(points: jnp.ndarray, ids: jnp.ndarray, cells: int,
                   half_extent: float) -> jnp.ndarray:
  """Augmented point features for one sample.

  Args:
    points: [P, 5] x, y, z, intensity, time lag; ids: [P] pillar ids (cells**2 = dropped).

  Returns:
    [P, 10]: the 5 inputs, offsets to the pillar's point mean (3), offsets to its centre (2).
  """
  n = cells * cells
  valid = (ids < n).astype(points.dtype)
  counts = jax.ops.segment_sum(valid, ids, n + 1)
  sums = jax.ops.segment_sum(points[:, :3] * valid[:, None], ids, n + 1)
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  size = 2.0 * half_extent / cells
  i, j = ids // cells, ids % cells
  centre = jnp.stack([-half_extent + (i + 0.5) * size, -half_extent + (j + 0.5) * size], -1)
  feats = jnp.concatenate([points[:, :5], points[:, :3] - mean[ids], points[:, :2] - centre], -1)
  return feats * valid[:, None]


class PillarFeatureNet(nn.Module):
  """Two PFN layers (the second sees its pillar's max of the first), max over points per pillar
  by segment ops, scattered onto the static canvas [B, cells, cells, C]; empty pillars are 0."""
  features: int
  cells: int
  half_extent: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, points: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """points [B, P, 5], ids [B, P] -> pseudo-image [B, cells, cells, features]."""
    b, p = ids.shape
    n = self.cells * self.cells
    x = jax.vmap(lambda pt, i: point_features(pt, i, self.cells, self.half_extent))(points, ids)
    seg = (ids + jnp.arange(b)[:, None] * (n + 1)).reshape(-1)   # per-sample segments
    x = x.reshape(b * p, NUM_POINT_FEATURES).astype(self.dtype)
    h = nn.relu(LayerNorm(dtype=self.dtype)(
        Dense(self.features // 2, dtype=self.dtype)(x)))
    pmax = jax.ops.segment_max(h, seg, b * (n + 1))
    h = jnp.concatenate([h, pmax[seg]], axis=-1)
    h = nn.relu(LayerNorm(dtype=self.dtype)(Dense(self.features, dtype=self.dtype)(h)))
    pillars = jax.ops.segment_max(h, seg, b * (n + 1)).reshape(b, n + 1, self.features)[:, :n]
    counts = jax.ops.segment_sum((ids < n).astype(jnp.int32).reshape(-1), seg, b * (n + 1))
    occupied = counts.reshape(b, n + 1)[:, :n, None] > 0
    # segment_max of an empty segment is -inf (or the dtype's lowest): force exact zeros.
    pillars = jnp.where(occupied, pillars, 0)
    return pillars.reshape(b, self.cells, self.cells, self.features)


class BEVBackbone(nn.Module):
  """Multi-scale 2D conv backbone (SECOND-FPN style) from the pillar canvas to the volume's
  x-y resolution: stride-2 stages down to `out_stride`, one more stage at 2 * out_stride,
  upsampled back and concatenated."""
  channels: int
  blocks: int
  out_stride: int
  dtype: Any = jnp.float32

  def _stage(self, x, stride, name):
    x = Conv(self.channels, (3, 3), strides=stride, dtype=self.dtype, name=f'{name}_down')(x)
    x = nn.relu(LayerNorm(dtype=self.dtype, name=f'{name}_norm0')(x))
    for k in range(1, self.blocks):
      y = Conv(self.channels, (3, 3), dtype=self.dtype, name=f'{name}_conv{k}')(x)
      x = x + nn.relu(LayerNorm(dtype=self.dtype, name=f'{name}_norm{k}')(y))
    return x

  @nn.compact
  def __call__(self, canvas: jnp.ndarray) -> jnp.ndarray:
    """[B, C, C, F] -> [B, C / out_stride, C / out_stride, channels]."""
    x, stride, k = canvas, 1, 0
    while stride < self.out_stride:
      x, stride, k = self._stage(x, 2, f'stage{k}'), stride * 2, k + 1
    if k == 0:
      x = self._stage(x, 1, 'stage0')
      k = 1
    coarse = self._stage(x, 2, f'stage{k}')
    up = nn.ConvTranspose(self.channels, (2, 2), strides=(2, 2), dtype=self.dtype,
                          name='upsample')(coarse)
    x = jnp.concatenate([x, up], axis=-1)
    return nn.relu(Dense(self.channels, dtype=self.dtype, name='merge')(x))


class LiDAREncoder(nn.Module):
  """Points -> (masked) pillars -> PFN -> BEV backbone.

  Attributes: pillar canvas geometry, widths, the mask ratio and the masking block edge in
  pillars (the backbone uses volume_stride: blocks = fused-volume cells).
  """
  cells: int
  half_extent: float
  z_min: float
  z_max: float
  pillar_features: int
  bev_channels: int
  bev_blocks: int
  out_stride: int
  mask_ratio: float
  mask_block: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, points: jnp.ndarray, points_mask: jnp.ndarray,
               mask: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """points [B, P, 5], points_mask [B, P] -> BEV features [B, X, Y, bev_channels] and the
    dropped blocks [B, cells / mask_block, cells / mask_block] (all False when mask is False);
    uses the 'mask' rng."""
    ids = pillar_ids(points, points_mask, self.cells, self.half_extent, self.z_min, self.z_max)
    if mask and self.mask_ratio > 0:
      ids, dropped = mask_pillars(self.make_rng('mask'), ids, self.cells, self.mask_ratio,
                                  self.mask_block)
    else:
      nb = self.cells // self.mask_block
      dropped = jnp.zeros(ids.shape[:1] + (nb, nb), bool)
    canvas = PillarFeatureNet(self.pillar_features, self.cells, self.half_extent,
                              dtype=self.dtype, name='pfn')(points, ids)
    bev = BEVBackbone(self.bev_channels, self.bev_blocks, self.out_stride, dtype=self.dtype,
                      name='bev_backbone')(canvas)
    return bev, dropped
