"""3D detection model: the NS-MAE backbone + a CenterPoint-style centre head on the fused BEV map.

Parameter tree: {'backbone': NSMAEBackbone params (the tree of pre-training's
params['backbone'], restored from its checkpoint as for segmentation), 'head': CenterHead}.

The head predicts on its own BEV grid over [-E, E]^2 of the key frame's LIDAR_TOP frame, indexed
[x, y]: cell (i, j) covers x in [-E + i r, -E + (i + 1) r) (r = config.detection.det_resolution),
so its centre is at x = -E + (i + 1/2) r, as every BEV grid of the project.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.data.schema import NUM_DETECTION_CLASSES
from nsmae_jax.models import NSMAEBackbone, compute_dtype
from nsmae_jax.models.conv import Conv
from nsmae_jax.models.norm import LayerNorm

# Regression channels of the head, in this order (all at a box's centre cell):
#   0-1 offset of the centre inside its cell (x, y; in cells, [0, 1)), 2 z (m), 3-5 log l, w, h
#   (m), 6-7 sin, cos of yaw, 8-9 vx, vy (m/s). LiDAR frame.
REGRESSION = {'offset': (0, 2), 'z': (2, 3), 'log_size': (3, 6), 'rot': (6, 8), 'vel': (8, 10)}
NUM_REGRESSION = 10
# The heatmap's initial bias: sigmoid(-2.19) = 0.1, CenterNet's prior, keeps the first focal
# losses small.
HEATMAP_PRIOR_BIAS = -2.19


def det_cells(config: Config) -> int:
  """Cells per side of the detection grid: 2 E / det_resolution."""
  return int(round(2 * config.data.bev_half_extent / config.detection.det_resolution))


class CenterHead(nn.Module):
  """CenterPoint's head: a shared 3x3 conv block, then one small branch per output.

  Input bev [B, X, Y, C] (fused BEV map, LiDAR frame, [x, y]) is resampled to the detection grid
  [B, N, N, C] with a half-pixel-centred bilinear resize (both grids span [-E, E]^2 with cell
  centres at -E + (i + 1/2) r, so this is exact resampling). LayerNorm replaces BatchNorm (the
  loop carries no batch statistics).
  """
  out_cells: int
  channels: int = 64
  num_classes: int = NUM_DETECTION_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bev: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """bev [B, X, Y, Cb] -> {'heatmap': logits [B, N, N, classes], 'regression': [B, N, N, 10]}."""
    b, _, _, cb = bev.shape
    x = jax.image.resize(bev, (b, self.out_cells, self.out_cells, cb), 'bilinear')

    def block(h, name):
      h = Conv(self.channels, (3, 3), use_bias=False, dtype=self.dtype, name=f'{name}_conv')(h)
      return nn.relu(LayerNorm(dtype=self.dtype, name=f'{name}_norm')(h))

    shared = block(x, 'shared')
    heat = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='heatmap',
                bias_init=nn.initializers.constant(HEATMAP_PRIOR_BIAS))(block(shared, 'heat'))
    regs = []
    for name, (lo, hi) in REGRESSION.items():
      regs.append(Conv(hi - lo, (1, 1), dtype=self.dtype, name=name)(block(shared, name)))
    return {'heatmap': heat.astype(jnp.float32),
            'regression': jnp.concatenate(regs, axis=-1).astype(jnp.float32)}


class DetModel(nn.Module):
  """Batch -> CenterHead outputs on the detection grid (see CenterHead); masking off."""
  config: Config

  def setup(self):
    self.backbone = NSMAEBackbone(self.config)
    self.head = CenterHead(out_cells=det_cells(self.config),
                           channels=self.config.detection.det_head_channels,
                           dtype=compute_dtype(self.config))

  def __call__(self, batch: dict, train: bool = False) -> dict[str, jnp.ndarray]:
    feats = self.backbone(batch, train=train, mask=False)
    return self.head(feats['bev'])
