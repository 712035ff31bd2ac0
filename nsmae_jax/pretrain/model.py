"""The NS-MAE pre-training model: the shared backbone encodes the (masked) inputs into a fused
volume and a fused BEV map; a radiance field renders the volume in the perspective view and
the BEV map (decoded into a volume) in the BEV view.

The model draws no rays and knows no targets: nsmae_jax.pretrain.targets draws both, from the
unmasked batch, in one place, for the training step and for full-view pictures alike.

Why the BEV view renders the BEV map: the paper renders the fused representation "in both
perspective and BEV views", the BEV one from the fused BEV features; and the BEV map (fusion's
bev_conv) is what the fine-tuning heads start from, so it has to learn in pre-training. A linear
`bev_decoder` lifts each BEV cell's features to the Z cells of its column (as fusion's
height_lift does for the LiDAR BEV), and the same field renders it.

Parameter tree: {'backbone': {'lidar', 'camera', 'lifting', 'fusion'}, 'field', 'bev_decoder',
'background' (only with --background=learned)}; fine-tuning restores 'backbone'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.config import Config, ConfigError
from nsmae_jax.models import NSMAEBackbone, compute_dtype, resolve_size
from nsmae_jax.models.dense import Dense
from nsmae_jax.render import RadianceField, box_near_far, render_rays
from nsmae_jax.render.guidance import carved_occupancy_grid, grid_shape, occupancy_grid


class NSMAE(nn.Module):
  """Submodules: backbone (NSMAEBackbone), field (RadianceField), bev_decoder; a learned
  background colour. Geometry in the LiDAR frame."""
  config: Config

  def setup(self):
    c, dtype = self.config, compute_dtype(self.config)
    self.box_min, self.box_max = c.volume_bounds
    self.backbone = NSMAEBackbone(c)
    self.field = RadianceField(width=c.render.field_width, depth=c.render.field_depth,
                               pos_freqs=c.render.pos_freqs, dir_freqs=c.render.dir_freqs,
                               box_min=self.box_min, box_max=self.box_max, dtype=dtype)
    channels = resolve_size(c).volume_channels
    self.bev_decoder = Dense(c.volume_shape[2] * channels, dtype=dtype)
    if c.render.background == 'learned':
      # Logits of the colour behind the volume (sky, far facades); sigmoid(0) = mid grey.
      self.background = self.param('background', nn.initializers.zeros, (3,))

  def encode(self, batch: dict, mask: bool = False) -> dict:
    """The backbone's outputs (bev, volume, image_mask, lidar_block_mask, pillar_mask);
    mask=True needs the 'mask' rng."""
    return self.backbone(batch, mask=mask)

  def bev_volume(self, bev: jnp.ndarray) -> jnp.ndarray:
    """Fused BEV map [B, X, Y, Cb] -> the volume the BEV view renders [B, X, Y, Z, Cv]."""
    b, x, y, _ = bev.shape
    return self.bev_decoder(bev).reshape(b, x, y, self.config.volume_shape[2], -1)

  def view_volumes(self, feats: dict) -> dict[str, jnp.ndarray]:
    """Backbone outputs -> {view: the volume its rays render}."""
    return {'perspective': feats['volume'], 'bev': self.bev_volume(feats['bev'])}

  def occupancy(self, batch: dict) -> jnp.ndarray | None:
    """The LiDAR occupancy grids [B, Gx, Gy, Gz] that guide sampling (--sampling=lidar), from
    every valid return of the unmasked batch (the encoder's masking hides returns from the
    features, not from the sampler, as in UniPAD's depth-aware sampling); three-state
    (occupied / unknown / free) with --free_space_carving; None when stratified."""
    r = self.config.render
    if r.sampling != 'lidar':
      return None
    shape = grid_shape(self.box_min, self.box_max, r.occupancy_cell)
    build = carved_occupancy_grid if r.free_space_carving else occupancy_grid
    grid = lambda p, v: build(p[:, :3], v, self.box_min, self.box_max, shape,
                              r.occupancy_dilation)
    return jax.vmap(grid)(batch['points'], batch['points_mask'])

  def render(self, volume: jnp.ndarray, origins: jnp.ndarray, dirs: jnp.ndarray,
             near: jnp.ndarray, key: jax.Array | None,
             occupancy: jnp.ndarray | None = None) -> dict:
    """volume [B, X, Y, Z, C]; origins, dirs [B, R, 3]; near [B, R] (m) -> composite() outputs
    [B, R, ...] (over the background colour) and hit [B, R] (the ray spends positive length
    inside the volume). key None: deterministic samples; else jittered. occupancy: [B, Gx, Gy,
    Gz] from occupancy() (needed with --sampling=lidar), None: stratified samples."""
    r = self.config.render
    if (occupancy is None) != (r.sampling != 'lidar'):
      raise ValueError(f'--sampling={r.sampling} with occupancy '
                       f'{"missing" if occupancy is None else "given"}: pass occupancy() here')
    n, f, hit = box_near_far(origins, dirs, self.box_min, self.box_max, near)
    background = (nn.sigmoid(self.background) if r.background == 'learned' else None)
    out = render_rays(self.field, volume, origins, dirs, n, f, r.num_samples,
                      self.box_min, self.box_max, key, background,
                      remat=self.config.train.remat, occupancy=occupancy,
                      coarse_samples=r.coarse_samples, uniform_fraction=r.uniform_fraction,
                      free_space_carving=r.free_space_carving)
    out['hit'] = hit
    return out

  def __call__(self, batch: dict, rays: dict[str, dict], train: bool = True,
               mask: bool | None = None) -> tuple[dict, dict[str, dict]]:
    """Encodes `batch` and renders each view's rays ({view: dict(origins, dirs [B, R, 3],
    near [B, R])}).

    train: jittered samples (needs the 'render' rng); mask: MAE masking (needs the 'mask' rng),
    None = as train. Returns (backbone outputs, {view: render() outputs}).
    """
    feats = self.encode(batch, mask=train if mask is None else mask)
    volumes = self.view_volumes(feats)
    key = self.make_rng('render') if train else None
    keys = jax.random.split(key, len(rays)) if train else [None] * len(rays)
    occupancy = self.occupancy(batch)
    rendered = {name: self.render(volumes[name], r['origins'], r['dirs'], r['near'], k,
                                  occupancy)
                for (name, r), k in zip(sorted(rays.items()), keys)}
    return feats, rendered


def build_pretrain_model(config: Config) -> NSMAE:
  """The pre-training model for `config` (sizes from config.model.model_size)."""
  resolve_size(config)  # fail early on a bad size name
  if config.finetune.modalities != 'camera,lidar':
    # Pre-training renders the fused field of both sensors (single-modality models are
    # fine-tuned from a joint pre-training): refused here, before anything is built.
    raise ConfigError(f'--modalities={config.finetune.modalities}: NS-MAE pre-training needs '
                      'both sensors (camera,lidar); --modalities selects the fine-tuned model')
  return NSMAE(config)


def param_groups(params: dict) -> dict[str, Any]:
  """NSMAE params -> {'lidar', 'camera', 'lifting', 'fusion', 'field', 'bev_decoder'} subtrees
  ('field' also holds the learned background colour when there is one)."""
  bb = params['backbone']
  field = dict(params['field'])
  if 'background' in params:
    field['background'] = params['background']
  return {'lidar': bb['lidar'], 'camera': bb['camera'], 'lifting': bb['lifting'],
          'fusion': bb['fusion'], 'field': field, 'bev_decoder': params['bev_decoder']}
