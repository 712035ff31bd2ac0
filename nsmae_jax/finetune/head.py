"""BEV map segmentation model: the NS-MAE backbone + a BEVFusion-style segmentation head.

Parameter tree: {'backbone': NSMAEBackbone params (same tree as pre-training's
params['backbone'], so it can be restored from a pre-training checkpoint), 'head': ...}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.data.schema import NUM_MAP_CLASSES
from nsmae_jax.models import NSMAEBackbone, compute_dtype
from nsmae_jax.models.conv import Conv
from nsmae_jax.models.norm import LayerNorm



class BEVSegHead(nn.Module):
  """BEVFusion's BEVSegmentationHead: grid transform, two 3x3 conv-norm-relu, 1x1 classifier.

  BEVFusion resamples with grid_sample from the feature grid to the target grid; here both grids
  span the same [-E, E]^2 of the LiDAR frame with cell centres at -E + (i + 0.5) r, so a
  half-pixel-centred bilinear resize is exactly that resampling. LayerNorm stands in for
  BatchNorm (the loop carries no batch statistics; per-device batches are 1-2 examples).
  """
  out_cells: int                 # target cells per side (config.data.bev_cells)
  channels: int = 64             # conv width
  num_classes: int = NUM_MAP_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bev: jnp.ndarray) -> jnp.ndarray:
    """bev [B, X, Y, Cb] (LiDAR frame, [x, y]) -> logits [B, out_cells, out_cells, classes]."""
    b, _, _, cb = bev.shape
    x = jax.image.resize(bev, (b, self.out_cells, self.out_cells, cb), 'bilinear')
    for k in range(2):
      x = Conv(self.channels, (3, 3), use_bias=False, dtype=self.dtype, name=f'conv{k}')(x)
      x = nn.relu(LayerNorm(dtype=self.dtype, name=f'norm{k}')(x))
    # Bias towards "absent" (prior 0.1, as detection heads do) so early focal losses are small.
    logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier',
                  bias_init=nn.initializers.constant(-2.2))(x)
    return logits.astype(jnp.float32)


class BEVSegModel(nn.Module):
  """Batch -> per-class BEV logits [B, Hb, Wb, 6] (Hb = config.data.bev_cells, [x, y] indexing).

  The backbone runs with masking off (fine-tuning sees whole inputs).
  """
  config: Config

  def setup(self):
    self.backbone = NSMAEBackbone(self.config)
    self.head = BEVSegHead(out_cells=self.config.data.bev_cells,
                           channels=self.config.finetune.seg_head_channels,
                           dtype=compute_dtype(self.config))

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    feats = self.backbone(batch, train=train, mask=False)
    return self.head(feats['bev'])


def seg_loss(logits: jnp.ndarray, labels: jnp.ndarray, kind: str = 'focal',
             alpha: float = -1.0, gamma: float = 2.0) -> jnp.ndarray:
  """BEVFusion's map loss. logits, labels [..., C] (labels in {0, 1}) -> scalar.

  Per class, the mean over cells (and examples) of sigmoid focal loss (kind='focal'; gamma 2,
  alpha -1 = no class weighting, BEVFusion's defaults) or binary cross-entropy (kind='bce');
  the class losses are summed, as BEVFusion sums its per-class loss entries.
  """
  labels = labels.astype(jnp.float32)
  ce = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  if kind == 'focal':
    p = jax.nn.sigmoid(logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
      loss = loss * (alpha * labels + (1 - alpha) * (1 - labels))
  elif kind == 'bce':
    loss = ce
  else:
    raise ValueError(f'--seg_loss: must be focal or bce, got {kind!r}')
  per_class = jnp.mean(loss.reshape(-1, loss.shape[-1]), axis=0)
  return jnp.sum(per_class)
