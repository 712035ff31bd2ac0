"""The NS-MAE backbone shared by pre-training and fine-tuning: LiDAR + camera encoders,
geometric lifting, fusion. Its params are the 'backbone' subtree of a pre-training checkpoint,
restored by fine-tuning into a model that also uses NSMAEBackbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.models.fusion import Fusion
from nsmae_jax.models.lifting import CameraLifting
from nsmae_jax.models.pillars import LiDAREncoder, block_to_pillars
from nsmae_jax.models.sizes import resolve_size
from nsmae_jax.models.vit import ViTEncoder


def compute_dtype(config: Config) -> Any:
  return jnp.bfloat16 if config.train.half_precision else jnp.float32


class NSMAEBackbone(nn.Module):
  """Batch -> fused 3D volume and BEV map (LiDAR frame). Submodules: lidar, camera, lifting,
  fusion."""
  config: Config

  def setup(self):
    c, size, dtype = self.config, resolve_size(self.config), compute_dtype(self.config)
    box_min, box_max = c.volume_bounds
    self.lidar = LiDAREncoder(
        cells=c.pillar_cells, half_extent=c.data.bev_half_extent, z_min=c.model.z_min,
        z_max=c.model.z_max, pillar_features=size.pillar_features,
        bev_channels=size.bev_channels, bev_blocks=size.bev_blocks,
        out_stride=c.model.volume_stride, mask_ratio=c.model.lidar_mask_ratio,
        mask_block=c.model.volume_stride, dtype=dtype)
    self.camera = ViTEncoder(
        patch=c.model.patch_size, width=size.vit_width, depth=size.vit_depth,
        heads=size.vit_heads, mlp_ratio=size.vit_mlp_ratio, out_channels=size.camera_channels,
        mask_ratio=c.model.image_mask_ratio, dtype=dtype)
    self.lifting = CameraLifting(
        volume_shape=c.volume_shape, box_min=box_min, box_max=box_max,
        image_hw=(c.data.image_height, c.data.image_width), channels=size.volume_channels,
        dtype=dtype)
    self.fusion = Fusion(volume_channels=size.volume_channels, bev_channels=size.bev_channels,
                         dtype=dtype)

  def __call__(self, batch: dict, train: bool = False, mask: bool = False) -> dict:
    """batch (the batch contract) -> dict(bev [B, X, Y, Cb], volume [B, X, Y, Z, Cv],
    image_mask [B, 6, gh, gw] bool (True = masked patch), lidar_block_mask [B, X, Y] bool (True =
    the LiDAR points of that fused-volume x-y cell were dropped), pillar_mask [B, cells**2] bool
    (the same per pillar)).

    mask=True applies MAE masking (needs the 'mask' rng); `train` is accepted for heads that
    may add dropout later and has no effect here.
    """
    del train
    points = batch['points'].astype(jnp.float32)
    lidar_bev, dropped = self.lidar(points, batch['points_mask'], mask)
    feats, image_mask = self.camera(batch['images'].astype(jnp.float32), mask)
    cam_vol = self.lifting(feats, batch['intrinsics'], batch['cam2lidar'])
    volume, bev = self.fusion(lidar_bev, cam_vol)
    return dict(bev=bev, volume=volume, image_mask=image_mask, lidar_block_mask=dropped,
                pillar_mask=block_to_pillars(dropped, self.config.model.volume_stride))
