"""CenterPoint training targets and losses, per example, pure jnp (jit/vmap-able).

Boxes are the batch's `boxes` [M, 9] (x, y, z, l, w, h, yaw, vx, vy in the key frame's LIDAR_TOP
frame; yaw of the length axis about z from +x) with `box_labels` [M] (DETECTION_CLASSES index)
and `boxes_mask` [M]. The grid is the detection head's: N x N cells of size r over [-E, E]^2,
indexed [x, y]; a box belongs to the cell that contains its centre, (floor((x + E) / r),
floor((y + E) / r)), and its offset is the centre's position inside that cell in cells, [0, 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nsmae_jax.data.schema import NUM_DETECTION_CLASSES
from nsmae_jax.finetune.det3d.head import NUM_REGRESSION

# CenterPoint's nuScenes code weights of the 10 regression channels (offset, z, log size,
# sin/cos yaw, velocity): velocity counts 0.2.
CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)


class Targets(NamedTuple):
  """What one example is trained against (detection grid, LiDAR frame)."""
  heatmap: jnp.ndarray     # float32 [N, N, classes]: Gaussian peaks (exactly 1 at centres)
  regression: jnp.ndarray  # float32 [M, 10]: see head.REGRESSION
  cell: jnp.ndarray        # int32 [M, 2]: (i, j) of each box's centre cell
  valid: jnp.ndarray       # bool [M]: a real box whose centre lies on the grid


def gaussian_radius(length: jnp.ndarray, width: jnp.ndarray, min_overlap: float) -> jnp.ndarray:
  """CornerNet's radius (as CenterPoint uses it) in the units of length/width (cells).

  The largest shift of a box's corners that keeps IoU >= min_overlap with the true box, taken
  as the smallest root of the three cases (both corners inside / outside, one of each).
  """
  a1, b1 = 1.0, length + width
  c1 = width * length * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + jnp.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
  a2, b2 = 4.0, 2 * (length + width)
  c2 = (1 - min_overlap) * width * length
  r2 = (b2 + jnp.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
  a3, b3 = 4 * min_overlap, -2 * min_overlap * (length + width)
  c3 = (min_overlap - 1) * width * length
  r3 = (b3 + jnp.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
  return jnp.minimum(jnp.minimum(r1, r2), r3)


def center_targets(boxes: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray, *,
                   half_extent: float, resolution: float, cells: int, min_overlap: float = 0.1,
                   min_radius: int = 2, num_classes: int = NUM_DETECTION_CLASSES) -> Targets:
  """Heatmap and regression targets of one example.

  Args:
    boxes: float32 [M, 9] LiDAR frame (module docstring).
    labels: int32 [M] class indices.
    mask: bool [M] real (not padding) boxes.
    half_extent, resolution, cells: the detection grid (E, r, N = 2E / r).
    min_overlap, min_radius: CenterPoint's Gaussian size: radius = max(min_radius,
      int(gaussian_radius(l / r, w / r))) cells, sigma = (2 radius + 1) / 6, drawn on the
      (2 radius + 1)^2 window around the centre cell; classes take the max over their boxes.
  """
  pos = (boxes[:, :2] + half_extent) / resolution          # [M, 2] continuous cell coordinates
  cell = jnp.floor(pos).astype(jnp.int32)
  valid = mask & jnp.all((cell >= 0) & (cell < cells), axis=-1)
  cell = jnp.clip(cell, 0, cells - 1)
  radius = gaussian_radius(boxes[:, 3] / resolution, boxes[:, 4] / resolution, min_overlap)
  radius = jnp.maximum(jnp.floor(radius), min_radius)      # [M], whole cells as CenterPoint
  sigma = (2 * radius + 1) / 6
  grid = jnp.arange(cells)
  di = grid[None, :] - cell[:, :1]                         # [M, N] along x
  dj = grid[None, :] - cell[:, 1:]                         # [M, N] along y
  inside = (jnp.abs(di)[:, :, None] <= radius[:, None, None]) & (
      jnp.abs(dj)[:, None, :] <= radius[:, None, None])
  g = jnp.exp(-(di[:, :, None] ** 2 + dj[:, None, :] ** 2) / (2 * sigma[:, None, None] ** 2))
  g = jnp.where(inside & valid[:, None, None], g, 0.0)    # [M, N, N]
  heat = jnp.zeros((num_classes, cells, cells), jnp.float32).at[
      jnp.where(valid, labels, 0)].max(g.astype(jnp.float32))
  yaw = boxes[:, 6]
  regression = jnp.concatenate([
      pos - cell, boxes[:, 2:3], jnp.log(jnp.maximum(boxes[:, 3:6], 1e-3)),
      jnp.sin(yaw)[:, None], jnp.cos(yaw)[:, None], boxes[:, 7:9]], axis=-1)
  return Targets(jnp.moveaxis(heat, 0, -1), regression.astype(jnp.float32), cell, valid)


def focal_loss(logits: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed / number of peaks.

  logits, target [..., N, N, classes]; a peak is a cell where the target is exactly 1.
  """
  pos = target >= 1.0
  log_p, log_1mp = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  p = jnp.exp(log_p)
  pos_loss = jnp.where(pos, log_p * (1 - p) ** 2, 0.0)
  neg_loss = jnp.where(pos, 0.0, log_1mp * p ** 2 * (1 - target) ** 4)
  return -(jnp.sum(pos_loss) + jnp.sum(neg_loss)) / jnp.maximum(jnp.sum(pos), 1.0)


def regression_loss(regression_map: jnp.ndarray, targets: Targets,
                    code_weights=CODE_WEIGHTS) -> jnp.ndarray:
  """Weighted L1 at the boxes' centre cells, / number of boxes (CenterPoint's RegLoss).

  regression_map [N, N, 10] (head output of one example); targets from center_targets.
  """
  pred = regression_map[targets.cell[:, 0], targets.cell[:, 1]]   # [M, 10]
  err = jnp.abs(pred - targets.regression) * targets.valid[:, None]
  per_channel = jnp.sum(err, axis=0) / (jnp.sum(targets.valid) + 1e-4)
  return jnp.sum(per_channel * jnp.asarray(code_weights, jnp.float32)[:NUM_REGRESSION])
