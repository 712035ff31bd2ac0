"""BEV pictures of predicted vs true boxes (matplotlib, host side), forward (+y) up, +x right."""

from __future__ import annotations

import numpy as np

from nsmae_jax.data.schema import DETECTION_CLASSES


def box_corners(boxes: np.ndarray) -> np.ndarray:
  """boxes [K, >=7] (x, y, z, l, w, h, yaw; LiDAR frame) -> ground corners [K, 4, 2] (x, y)."""
  boxes = np.asarray(boxes, np.float64)
  half = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], np.float64) / 2
  local = half[None] * boxes[:, None, [3, 4]]                      # along length, width
  c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
  x = boxes[:, None, 0] + c * local[..., 0] - s * local[..., 1]
  y = boxes[:, None, 1] + s * local[..., 0] + c * local[..., 1]
  return np.stack([x, y], axis=-1)


def bev_boxes_image(points: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                    pred_boxes: np.ndarray, pred_scores: np.ndarray, pred_labels: np.ndarray,
                    half_extent: float, heatmap: np.ndarray | None = None,
                    size_px: int = 480) -> np.ndarray:
  """RGB [size_px, size_px (x2 with a heatmap), 3] in [0, 1].

  Left: LiDAR points (grey), true boxes (green) and predicted boxes (red, line weight by score,
  class initial) over [-E, E]^2 of the LiDAR frame; the ego at the centre. Right (when heatmap
  [N, N] is given, [x, y] indexed): the predicted heatmap, max over classes.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = 2 if heatmap is not None else 1
  fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.8), dpi=size_px / 4.8)
  axes = np.atleast_1d(axes)
  ax = axes[0]
  e = half_extent
  if len(points):
    ax.scatter(points[:, 0], points[:, 1], s=0.2, c='0.6', linewidths=0)
  for corners, label in zip(box_corners(gt_boxes), gt_labels):
    ax.add_patch(plt.Polygon(corners, closed=True, fill=False, ec='tab:green', lw=1.2))
  for corners, score, label in zip(box_corners(pred_boxes), pred_scores, pred_labels):
    ax.add_patch(plt.Polygon(corners, closed=True, fill=False, ec='tab:red',
                             lw=0.5 + 1.5 * float(score)))
    ax.text(corners[:, 0].mean(), corners[:, 1].mean(), DETECTION_CLASSES[int(label)][0],
            color='tab:red', fontsize=5, ha='center', va='center')
  ax.plot([0], [0], marker='^', color='k', ms=4)
  ax.set_xlim(-e, e)
  ax.set_ylim(-e, e)
  ax.set_aspect('equal')
  ax.set_title('true (green) vs predicted (red)', fontsize=8)
  ax.tick_params(labelsize=6)
  if heatmap is not None:
    axes[1].imshow(np.asarray(heatmap).T, origin='lower', extent=(-e, e, -e, e), vmin=0, vmax=1,
                   cmap='magma')
    axes[1].set_title('heatmap (max over classes)', fontsize=8)
    axes[1].tick_params(labelsize=6)
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
  plt.close(fig)
  return image
