"""CenterPoint decoding, pure jnp (jit/vmap-able): local maxima -> top-k -> boxes -> circle NMS.

Output boxes are in the key frame's LIDAR_TOP frame, laid out as the batch's `boxes` [K, 9]
(x, y, z, l, w, h, yaw, vx, vy); the grid convention is targets.py's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nsmae_jax.data.schema import DETECTION_CLASSES
from nsmae_jax.finetune.det3d.head import REGRESSION

# CenterPoint's nuScenes circle-NMS thresholds on the squared centre distance (m^2) per class
# (its per-task `min_radius`, compared with squared distances), in DETECTION_CLASSES order.
CIRCLE_NMS_DIST2 = {'car': 4.0, 'truck': 12.0, 'bus': 10.0, 'trailer': 10.0,
                    'construction_vehicle': 12.0, 'pedestrian': 0.175, 'motorcycle': 0.85,
                    'bicycle': 0.85, 'traffic_cone': 0.175, 'barrier': 1.0}


class Detections(NamedTuple):
  """Top-k detections of one example, sorted by score (highest first)."""
  boxes: jnp.ndarray   # float32 [K, 9] LiDAR frame
  scores: jnp.ndarray  # float32 [K] sigmoid heatmap peak
  labels: jnp.ndarray  # int32 [K] DETECTION_CLASSES index
  valid: jnp.ndarray   # bool [K] above the score threshold and kept by NMS


def local_maxima(heat: jnp.ndarray) -> jnp.ndarray:
  """heat [N, N, C] -> heat where it equals its 3x3 neighbourhood's max per class, else 0."""
  pooled = jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (3, 3, 1), (1, 1, 1), 'SAME')
  return jnp.where(heat == pooled, heat, 0.0)


def circle_nms(centres: jnp.ndarray, labels: jnp.ndarray, valid: jnp.ndarray,
               dist2: jnp.ndarray) -> jnp.ndarray:
  """Greedy class-wise NMS on centre distance for candidates sorted by score.

  centres [K, 2], labels [K], valid [K] -> keep [K]: a candidate is dropped when a kept,
  higher-scoring candidate of its class lies within squared distance dist2[label].
  """
  k = centres.shape[0]
  d2 = jnp.sum((centres[:, None] - centres[None]) ** 2, axis=-1)
  same = labels[:, None] == labels[None]
  close = same & (d2 <= dist2[labels][:, None])
  earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]

  def body(i, keep):
    return keep.at[i].set(keep[i] & ~jnp.any(close[i] & earlier[i] & keep))

  return jax.lax.fori_loop(0, k, body, valid)


def decode(heatmap_logits: jnp.ndarray, regression: jnp.ndarray, *, half_extent: float,
           resolution: float, top_k: int, score_threshold: float = 0.0,
           nms: str = 'circle') -> Detections:
  """Boxes of one example from the head's outputs.

  Args:
    heatmap_logits: [N, N, C] logits on the detection grid ([x, y], LiDAR frame).
    regression: [N, N, 10] (head.REGRESSION channels).
    half_extent, resolution: the grid (E, r): x = -E + (i + offset_x) r.
    top_k: candidates kept after local-max pooling (K).
    score_threshold: candidates below it are invalid.
    nms: 'circle' (CIRCLE_NMS_DIST2) or 'none'.
  """
  n, _, c = heatmap_logits.shape
  heat = local_maxima(jax.nn.sigmoid(heatmap_logits))
  scores, flat = jax.lax.top_k(heat.reshape(-1), top_k)
  i, j, labels = flat // (n * c), (flat // c) % n, (flat % c).astype(jnp.int32)
  reg = regression[i, j]                                           # [K, 10]
  part = {name: reg[:, lo:hi] for name, (lo, hi) in REGRESSION.items()}
  xy = (jnp.stack([i, j], axis=-1) + part['offset']) * resolution - half_extent
  size = jnp.exp(jnp.clip(part['log_size'], -5.0, 5.0))           # clip: no overflow early on
  yaw = jnp.arctan2(part['rot'][:, 0], part['rot'][:, 1])
  boxes = jnp.concatenate([xy, part['z'], size, yaw[:, None], part['vel']], axis=-1)
  valid = scores > score_threshold
  if nms == 'circle':
    dist2 = jnp.asarray([CIRCLE_NMS_DIST2[name] for name in DETECTION_CLASSES], jnp.float32)
    valid = circle_nms(xy, labels, valid, dist2)
  elif nms != 'none':
    raise ValueError(f'--det_nms: must be circle or none, got {nms!r}')
  return Detections(boxes.astype(jnp.float32), scores, labels, valid)
