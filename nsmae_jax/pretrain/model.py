"""The NS-MAE pre-training model: the shared backbone encodes the (masked) inputs into a fused
volume, a radiance field renders that volume along given rays.

The model draws no rays and knows no targets: nsmae_jax.pretrain.targets draws both, from the
unmasked batch, in one place, for the training step and for full-view pictures alike.

Parameter tree: {'backbone': {'lidar', 'camera', 'lifting', 'fusion'}, 'field'}; fine-tuning
restores 'backbone'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.models import NSMAEBackbone, compute_dtype, resolve_size
from nsmae_jax.render import RadianceField, box_near_far, render_rays


class NSMAE(nn.Module):
  """Submodules: backbone (NSMAEBackbone), field (RadianceField). Geometry in the LiDAR frame."""
  config: Config

  def setup(self):
    c, dtype = self.config, compute_dtype(self.config)
    self.box_min, self.box_max = c.volume_bounds
    self.backbone = NSMAEBackbone(c)
    self.field = RadianceField(width=c.render.field_width, depth=c.render.field_depth,
                               pos_freqs=c.render.pos_freqs, dir_freqs=c.render.dir_freqs,
                               box_min=self.box_min, box_max=self.box_max, dtype=dtype)

  def encode(self, batch: dict, mask: bool = False) -> dict:
    """The backbone's outputs (bev, volume, image_mask, pillar_mask); mask=True needs 'mask'."""
    return self.backbone(batch, mask=mask)

  def render(self, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
             near: jnp.ndarray, key: jax.Array | None) -> dict:
    """volume [B, X, Y, Z, C]; origins, dirs [B, R, 3]; near [B, R] (m) -> composite() outputs
    [B, R, ...] and hit [B, R] (the ray spends positive length inside the volume). key None:
    bin-centre samples (deterministic); else stratified jitter."""
    n, f, hit = box_near_far(origins, dirs, self.box_min, self.box_max, near)
    out = render_rays(self.field, volume, origins, dirs, n, f, self.config.render.num_samples,
                      self.box_min, self.box_max, key)
    out['hit'] = hit
    return out

  def __call__(self, batch: dict, rays: dict[str, dict], train: bool = True
               ) -> tuple[dict, dict[str, dict]]:
    """Encodes `batch` (MAE masking and jittered samples when train) and renders each view's
    rays ({view: dict(origins, dirs [B, R, 3], near [B, R])}).

    Returns (backbone outputs, {view: render() outputs}). Needs the 'mask' and 'render' rngs
    when train.
    """
    feats = self.encode(batch, mask=train)
    key = self.make_rng('render') if train else None
    keys = jax.random.split(key, len(rays)) if train else [None] * len(rays)
    rendered = {name: self.render(feats['volume'], r['origins'], r['dirs'], r['near'], k)
                for (name, r), k in zip(sorted(rays.items()), keys)}
    return feats, rendered


def build_pretrain_model(config: Config) -> NSMAE:
  """The pre-training model for `config` (sizes from config.model.model_size)."""
  resolve_size(config)  # fail early on a bad size name
  return NSMAE(config)


def param_groups(params: dict) -> dict[str, Any]:
  """NSMAE params -> {'lidar', 'camera', 'lifting', 'fusion', 'field'} subtrees."""
  bb = params['backbone']
  return {'lidar': bb['lidar'], 'camera': bb['camera'], 'lifting': bb['lifting'],
          'fusion': bb['fusion'], 'field': params['field']}
