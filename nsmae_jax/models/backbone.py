"""The NS-MAE backbone shared by pre-training and fine-tuning: LiDAR + camera encoders,
geometric lifting, fusion. Its params are the 'backbone' subtree of a pre-training checkpoint,
restored by fine-tuning into a model that also uses NSMAEBackbone.

Fine-tuning may keep one modality (config.finetune.modalities): a camera-only backbone has no
'lidar' subtree and never reads `points`; a LiDAR-only one has no 'camera'/'lifting' subtrees and
never reads `images`, `intrinsics` or `cam2lidar`. Its tree is the joint tree minus the absent
branch (see nsmae_jax.models.fusion), so it restores from a joint pre-training checkpoint.
Pre-training is always joint.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nsmae_jax.config import Config, ConfigError
from nsmae_jax.models.fusion import MODALITIES, Fusion
from nsmae_jax.models.lifting import CameraLifting
from nsmae_jax.models.pillars import LiDAREncoder, block_to_pillars
from nsmae_jax.models.sizes import resolve_size
from nsmae_jax.models.vit import ViTEncoder


def compute_dtype(config: Config) -> Any:
  return jnp.bfloat16 if config.train.half_precision else jnp.float32


def modalities(config: Config) -> tuple[str, ...]:
  """The sensors the backbone reads, in MODALITIES order: ('camera', 'lidar'), ('camera',) or
  ('lidar',) from config.finetune.modalities."""
  names = config.finetune.modalities.split(',')
  return tuple(m for m in MODALITIES if m in names)


def drop_modality(batch: dict, modality: str) -> dict:
  """The batch as a missing sensor leaves it (a robustness test of a joint model): 'camera' ->
  black images (zeros, [B, 6, H, W, 3]); 'lidar' -> no points (points_mask all False, points
  zeros). Calibration stays: it describes the rig, not a measurement."""
  batch = dict(batch)
  if modality == 'camera':
    batch['images'] = jnp.zeros_like(batch['images'])
  elif modality == 'lidar':
    batch['points'] = jnp.zeros_like(batch['points'])
    batch['points_mask'] = jnp.zeros_like(batch['points_mask'])
  else:
    raise ValueError(f'drop_modality: must be camera or lidar, got {modality!r}')
  return batch


class NSMAEBackbone(nn.Module):
  """Batch -> fused 3D volume and BEV map (LiDAR frame). Submodules: lidar, camera, lifting,
  fusion; only those of the present modalities (see modalities())."""
  config: Config

  def setup(self):
    c, size, dtype = self.config, resolve_size(self.config), compute_dtype(self.config)
    box_min, box_max = c.volume_bounds
    self.modalities = modalities(c)
    if 'lidar' in self.modalities:
      self.lidar = LiDAREncoder(
          cells=c.pillar_cells, half_extent=c.data.bev_half_extent, z_min=c.model.z_min,
          z_max=c.model.z_max, pillar_features=size.pillar_features,
          bev_channels=size.bev_channels, bev_blocks=size.bev_blocks,
          out_stride=c.model.volume_stride, mask_ratio=c.model.lidar_mask_ratio,
          mask_block=c.model.volume_stride, dtype=dtype)
    if 'camera' in self.modalities:
      self.camera = ViTEncoder(
          patch=c.model.patch_size, width=size.vit_width, depth=size.vit_depth,
          heads=size.vit_heads, mlp_ratio=size.vit_mlp_ratio, out_channels=size.camera_channels,
          mask_ratio=c.model.image_mask_ratio, dtype=dtype, remat=c.train.remat)
      self.lifting = CameraLifting(
          volume_shape=c.volume_shape, box_min=box_min, box_max=box_max,
          image_hw=(c.data.image_height, c.data.image_width), channels=size.volume_channels,
          dtype=dtype, remat=c.train.remat)
    self.fusion = Fusion(volume_channels=size.volume_channels, bev_channels=size.bev_channels,
                         z_cells=c.volume_shape[2], modalities=self.modalities, dtype=dtype)

  def __call__(self, batch: dict, train: bool = False, mask: bool = False) -> dict:
    """batch (the batch contract; only the present modalities' arrays are read) -> dict(bev
    [B, X, Y, Cb], volume [B, X, Y, Z, Cv]; with cameras image_mask [B, 6, gh, gw] bool (True =
    masked patch); with LiDAR lidar_block_mask [B, X, Y] bool (True = the LiDAR points of that
    fused-volume x-y cell were dropped) and pillar_mask [B, cells**2] bool (the same per
    pillar)).

    mask=True applies MAE masking (needs the 'mask' rng) and is pre-training's: it needs both
    modalities. `train` is accepted for heads that may add dropout later and has no effect here.
    """
    del train
    if mask and self.modalities != MODALITIES:
      raise ConfigError(f'--modalities: pre-training is joint (camera,lidar); got '
                        f'{self.config.finetune.modalities!r}, a fine-tuning choice')
    out, lidar_bev, cam_vol = {}, None, None
    if 'lidar' in self.modalities:
      lidar_bev, dropped = self.lidar(batch['points'].astype(jnp.float32), batch['points_mask'],
                                      mask)
      out.update(lidar_block_mask=dropped,
                 pillar_mask=block_to_pillars(dropped, self.config.model.volume_stride))
    if 'camera' in self.modalities:
      feats, out['image_mask'] = self.camera(batch['images'].astype(jnp.float32), mask)
      cam_vol = self.lifting(feats, batch['intrinsics'], batch['cam2lidar'])
    out['volume'], out['bev'] = self.fusion(lidar_bev, cam_vol)
    return out
