"""NS-MAE: the shared backbone (LiDAR + camera encoders, lifting, fusion) and the pre-training
model (backbone + radiance field + rays/targets + rendering).

Parameter tree of NSMAE: {'backbone': {'lidar', 'camera', 'lifting', 'fusion'}, 'field'}; the
'backbone' subtree is what fine-tuning restores into a model that also uses NSMAEBackbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax import targets
from nsmae_jax.config import Config
from nsmae_jax.models.fusion import Fusion
from nsmae_jax.models.lifting import CameraLifting
from nsmae_jax.models.pillars import LiDAREncoder
from nsmae_jax.models.sizes import resolve_size
from nsmae_jax.models.vit import ViTEncoder
from nsmae_jax.render.field import RadianceField
from nsmae_jax.render.rays import box_near_far
from nsmae_jax.render.render import render_rays


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
        out_stride=c.model.volume_stride, mask_ratio=c.model.lidar_mask_ratio, dtype=dtype)
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
    image_mask [B, 6, gh, gw] bool, pillar_mask [B, cells**2] bool (True = dropped)).

    mask=True applies MAE masking (needs the 'mask' rng); `train` is accepted for heads that
    may add dropout later and has no effect here.
    """
    del train
    points = batch['points'].astype(jnp.float32)
    lidar_bev, dropped = self.lidar(points, batch['points_mask'], mask)
    feats, image_mask = self.camera(batch['images'].astype(jnp.float32), mask)
    cam_vol = self.lifting(feats, batch['intrinsics'], batch['cam2lidar'])
    volume, bev = self.fusion(lidar_bev, cam_vol)
    return dict(bev=bev, volume=volume, image_mask=image_mask, pillar_mask=dropped)


class NSMAE(nn.Module):
  """The pre-training model: rays and targets from the unmasked batch, renders the fused volume
  of the masked inputs. Submodules: backbone (NSMAEBackbone), field (RadianceField)."""
  config: Config

  def setup(self):
    c, dtype = self.config, compute_dtype(self.config)
    self.box_min, self.box_max = c.volume_bounds
    self.backbone = NSMAEBackbone(c)
    self.field = RadianceField(width=c.render.field_width, depth=c.render.field_depth,
                               pos_freqs=c.render.pos_freqs, dir_freqs=c.render.dir_freqs,
                               box_min=self.box_min, box_max=self.box_max, dtype=dtype)

  def encode(self, batch: dict, train: bool = False, mask: bool = False) -> dict:
    return self.backbone(batch, train=train, mask=mask)

  def render(self, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
             near: float, key: jax.Array | None) -> dict:
    """volume [B, X, Y, Z, C]; origins, dirs [B, R, 3] -> composite() outputs [B, R, ...]."""
    n, f, hit = box_near_far(origins, dirs, self.box_min, self.box_max, near)
    out = render_rays(self.field, volume, origins, dirs, n, f, self.config.render.num_samples,
                      self.box_min, self.box_max, key)
    out['hit'] = hit
    return out

  def __call__(self, batch: dict, train: bool = True) -> dict:
    """Renders the step's rays. train: MAE masking + stratified jitter; else neither.

    Returns dict(perspective=..., bev=...), each with the rendered color [B, R, 3], depth
    [B, R], opacity [B, R] and the targets color_target, depth_target, color_valid,
    depth_valid (a target counts only where the ray also hits the volume).
    """
    c = self.config
    feats = self.backbone(batch, train=train, mask=train)
    key = self.make_rng('rays')
    k_p, k_b, k_sp, k_sb = jax.random.split(key, 4)
    b = batch['points'].shape[0]
    args = (batch['images'].astype(jnp.float32), batch['intrinsics'].astype(jnp.float32),
            batch['cam2lidar'].astype(jnp.float32), batch['points'].astype(jnp.float32),
            batch['points_mask'])
    views = {}
    n_p = c.render.perspective_rays
    if n_p:
      n_lidar = n_p // 2
      tg = jax.vmap(lambda k, *a: targets.perspective_targets(
          k, *a, n_lidar, n_p - n_lidar, self.box_min, self.box_max))(
              jax.random.split(k_p, b), *args)
      views['perspective'] = (tg, self.render(feats['volume'], tg['origins'], tg['dirs'],
                                              c.render.near, k_sp if train else None))
    if c.render.bev_rays:
      grid = c.volume_shape[:2]
      tg = jax.vmap(lambda k, *a: targets.bev_targets(
          k, *a, min(c.render.bev_rays, grid[0] * grid[1]), grid, self.box_min,
          self.box_max))(jax.random.split(k_b, b), *args)
      views['bev'] = (tg, self.render(feats['volume'], tg['origins'], tg['dirs'], 0.0,
                                      k_sb if train else None))
    out = {}
    for name, (tg, r) in views.items():
      out[name] = dict(color=r['color'], depth=r['depth'], opacity=r['opacity'],
                       color_target=tg['color'], depth_target=tg['depth'],
                       color_valid=tg['color_valid'] & r['hit'],
                       depth_valid=tg['depth_valid'] & r['hit'])
    return out


def build_pretrain_model(config: Config) -> NSMAE:
  """The pre-training model for `config` (sizes from config.model.model_size)."""
  resolve_size(config)  # fail early on a bad size name
  return NSMAE(config)


def param_groups(params: dict) -> dict[str, Any]:
  """NSMAE params -> {'lidar', 'camera', 'lifting', 'fusion', 'field'} subtrees."""
  bb = params['backbone']
  return {'lidar': bb['lidar'], 'camera': bb['camera'], 'lifting': bb['lifting'],
          'fusion': bb['fusion'], 'field': params['field']}
