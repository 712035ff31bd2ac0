"""Figures for notebooks and reports: a sample, rendered views, BEV masks, a live loss curve.

Every function takes host arrays (numpy, or anything np.asarray accepts) of ONE example and
returns a `matplotlib.figure.Figure` built without pyplot, so nothing is drawn twice by a notebook
backend and everything runs headless (CI). `show(fig, name, save_dir)` displays a figure in
IPython (as a PNG) and/or writes `<save_dir>/<name>.png`.

Frames (DESIGN.md): geometry is in the key frame's LIDAR_TOP frame (x right, y forward, z up,
metres). BEV grids are indexed [x, y] and are drawn with +x to the right and +y (forward) up, in
metres over [-E, E]^2 of the LiDAR frame. Cameras come in nuScenes order (CAM_FRONT,
CAM_FRONT_RIGHT, CAM_FRONT_LEFT, CAM_BACK, CAM_BACK_LEFT, CAM_BACK_RIGHT) and are laid out as
the devkit lays them out (front row: left, front, right; back row: left, back, right).
"""

from __future__ import annotations

import functools
import io
import os
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

# The record's camera order and map classes (no TensorFlow or devkit import).
from nsmae_jax.data.schema import CAMERAS, MAP_CLASSES
from nsmae_jax.geometry import in_image, project_points

# Camera index (nuScenes order) at each cell of the 2 x 3 display grid.
CAMERA_GRID = ((2, 0, 1), (4, 3, 5))
DEPTH_CMAP = 'turbo'


def _default_style(fn):
  """Builds (and draws) figures under matplotlib's default style: nuscenes-devkit's map API
  switches the global style to seaborn's whitegrid on import, which would grid every image."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with matplotlib.style.context('default'):
      return fn(*args, **kwargs)
  return wrapper


def per_device_batch(batch: Mapping[str, Any], device: int = 0) -> dict[str, np.ndarray]:
  """Host batch [D, B, ...] (pipeline layout) -> device `device`'s batch [B, ...] (numeric keys)."""
  out = {}
  for k, v in batch.items():
    a = np.asarray(v)
    if a.dtype.kind in 'biuf' and a.ndim >= 2:
      out[k] = a[device]
  return out


def example_from_batch(batch: Mapping[str, Any], device: int = 0,
                       index: int = 0) -> dict[str, np.ndarray]:
  """Host batch [D, B, ...] -> one example (no leading axes), numeric keys only."""
  return {k: v[index] for k, v in per_device_batch(batch, device).items()}


def project_lidar(points: np.ndarray, points_mask: np.ndarray, intrinsics: np.ndarray,
                  cam2lidar: np.ndarray, image_hw: tuple[int, int], min_depth: float = 1.0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Projects LiDAR points into every camera.

  Args:
    points: [P, >=3] LiDAR frame (m); points_mask: [P] bool (padding is False).
    intrinsics: [6, 3, 3] for the stored image size; cam2lidar: [6, 4, 4] camera -> LiDAR.
    image_hw: (H, W) of the stored images.
    min_depth: points closer than this along the optical axis are dropped (the devkit's
      map_pointcloud_to_image uses 1 m, which hides the car's own body).

  Returns:
    Per camera (nuScenes order) (uv [n, 2] pixel coordinates, u right / v down, and depth [n]
    along the optical axis, m) of the points in front of it and inside its image.
  """
  pts = np.asarray(points, np.float32)[:, :3]
  valid = np.asarray(points_mask, bool)
  h, w = image_hw
  out = []
  for cam in range(np.shape(intrinsics)[0]):
    uv, depth, front = (np.asarray(a) for a in project_points(
        pts, np.asarray(intrinsics[cam], np.float32), np.asarray(cam2lidar[cam], np.float32),
        min_depth=min_depth))
    keep = valid & front & np.asarray(in_image(uv, h, w))
    out.append((uv[keep], depth[keep]))
  return out


@_default_style
def camera_lidar_figure(example: Mapping[str, Any], max_depth: float | None = None,
                        point_size: float = 1.5, min_depth: float = 1.0) -> Figure:
  """Six camera images with the LiDAR points projected on them, coloured by depth.

  example: one example with images [6, H, W, 3] in [0, 1] (or uint8), points [P, >=3] (LiDAR
  frame), points_mask [P], intrinsics [6, 3, 3], cam2lidar [6, 4, 4]. Depth (optical axis, m)
  maps to the colour scale from 0 to max_depth (default: the 99th percentile over cameras).
  """
  images = np.asarray(example['images'])
  if images.ndim != 4 or images.shape[0] != 6 or images.shape[-1] != 3:
    raise ValueError(f'camera_lidar_figure: images must be [6, H, W, 3], got {images.shape}')
  h, w = images.shape[1:3]
  projected = project_lidar(example['points'], example['points_mask'], example['intrinsics'],
                            example['cam2lidar'], (h, w), min_depth=min_depth)
  depths = np.concatenate([d for _, d in projected]) if projected else np.zeros(0)
  if max_depth is None:
    max_depth = float(np.percentile(depths, 99)) if depths.size else 1.0
  fig = Figure(figsize=(12, 12 * h / w * 2 / 3 + 0.8), layout='constrained')
  axes = fig.subplots(2, 3)
  scatter = None
  for r, row in enumerate(CAMERA_GRID):
    for c, cam in enumerate(row):
      ax = axes[r, c]
      ax.imshow(_as_rgb(images[cam]), extent=(0, w, h, 0))
      uv, depth = projected[cam]
      order = np.argsort(-depth)  # far first, so near points are drawn on top
      scatter = ax.scatter(uv[order, 0], uv[order, 1], c=depth[order], s=point_size,
                           cmap=DEPTH_CMAP, vmin=0.0, vmax=max_depth, linewidths=0)
      ax.set_xlim(0, w)
      ax.set_ylim(h, 0)
      ax.set_title(f'{CAMERAS[cam]} ({len(depth)} pts)', fontsize=9)
      ax.set_axis_off()
  if scatter is not None:
    fig.colorbar(scatter, ax=axes, shrink=0.6, label='LiDAR depth (m)')
  return fig


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype.kind in 'iu':
    return image.astype(np.uint8)
  return np.clip(image.astype(np.float32), 0.0, 1.0)


def _bev_image(ax, grid: np.ndarray, half_extent: float, **kw) -> Any:
  """Draws a [X, Y] (or [X, Y, 3]) LiDAR-frame grid with +x right, +y (forward) up, in metres."""
  grid = grid if np.ma.isMaskedArray(grid) else np.asarray(grid)
  img = np.swapaxes(grid, 0, 1)  # [Y, X(, 3)]: rows along y, columns along x
  e = half_extent
  im = ax.imshow(img, origin='lower', extent=(-e, e, -e, e), interpolation='nearest', **kw)
  ax.plot([0], [0], marker='^', color='red', markersize=5)  # the LiDAR, facing +y
  return im


@_default_style
def bev_map_figure(bev_map: np.ndarray, half_extent: float,
                   class_names: Sequence[str] = MAP_CLASSES) -> Figure:
  """BEV map masks [C, X, Y] (LiDAR frame, [x, y] indexing) -> one panel per class.

  Each panel spans [-E, E]^2 m of the LiDAR frame (E = half_extent), +y (forward) up; the red
  triangle is the LiDAR. Titles give the fraction of cells that are positive.
  """
  bev_map = np.asarray(bev_map)
  if bev_map.ndim != 3 or bev_map.shape[0] != len(class_names):
    raise ValueError(f'bev_map_figure: bev_map must be [{len(class_names)}, X, Y], got '
                     f'{bev_map.shape}')
  fig = Figure(figsize=(12, 2.6), layout='constrained')
  axes = fig.subplots(1, len(class_names))
  for k, name in enumerate(class_names):
    _bev_image(axes[k], bev_map[k] > 0, half_extent, cmap='gray', vmin=0, vmax=1)
    axes[k].set_title(f'{name} ({np.mean(bev_map[k] > 0):.0%})', fontsize=9)
    axes[k].tick_params(labelsize=7)
  axes[0].set_xlabel('x (m)')
  axes[0].set_ylabel('y, forward (m)')
  return fig


def _depth_cmap():
  """The depth colour map with pixels / cells that have no target (masked) drawn black."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  return matplotlib.colormaps[DEPTH_CMAP].with_extremes(bad='black')


def _masked_depth(depth: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
  depth = np.asarray(depth, np.float32)
  return depth if valid is None else np.ma.masked_where(~valid, depth)


@_default_style
def rendered_vs_target_figure(views: Mapping[str, np.ndarray], half_extent: float) -> Figure:
  """Rendered vs target colour and depth, perspective view (top row) and BEV view (bottom row).

  views: the dict of nsmae_jax.pretrain.render_views: perspective_color / _target [H, W, 3],
  perspective_depth / _target [H, W] (m along the ray; target 0 = no LiDAR return),
  bev_color / _target [X, Y, 3], bev_depth / _target [X, Y] (m below the volume top; target 0 =
  empty cell), BEV grids in the LiDAR frame. Target depth is drawn only where it exists; each
  view's rendered and target depth share one colour scale.
  """
  missing = [k for k in ('perspective_color', 'perspective_color_target', 'perspective_depth',
                         'perspective_depth_target', 'bev_color', 'bev_color_target',
                         'bev_depth', 'bev_depth_target') if k not in views]
  if missing:
    raise KeyError(f'rendered_vs_target_figure: views lack {missing} (pass render_views output)')
  fig = Figure(figsize=(14, 6.5), layout='constrained')
  axes = fig.subplots(2, 4)
  for r, view in enumerate(('perspective', 'bev')):
    target_depth = np.asarray(views[f'{view}_depth_target'], np.float32)
    has_target = target_depth > 0
    vmax = float(np.percentile(target_depth[has_target], 99)) if has_target.any() else float(
        np.max(views[f'{view}_depth']))
    panels = [(f'{view}_color', 'rendered colour', None),
              (f'{view}_color_target', 'target colour', None),
              (f'{view}_depth', 'rendered depth (m)', None),
              (f'{view}_depth_target', 'target depth (m)', has_target)]
    for c, (key, title, valid) in enumerate(panels):
      ax = axes[r, c]
      value = np.asarray(views[key])
      kw = {} if value.ndim == 3 else dict(cmap=_depth_cmap(), vmin=0.0, vmax=max(vmax, 1e-3))
      value = _as_rgb(value) if value.ndim == 3 else _masked_depth(value, valid)
      if view == 'bev':
        im = _bev_image(ax, value, half_extent, **kw)
        ax.tick_params(labelsize=7)
      else:
        im = ax.imshow(value, interpolation='nearest', **kw)
        ax.set_axis_off()
      if value.ndim == 2:
        fig.colorbar(im, ax=ax, shrink=0.8)
      ax.set_title(f'{"perspective (CAM_FRONT)" if view == "perspective" else "BEV"}: {title}',
                   fontsize=9)
  return fig


@_default_style
def predicted_vs_true_figure(probs: np.ndarray, labels: np.ndarray, half_extent: float,
                             threshold: float = 0.5,
                             class_names: Sequence[str] = MAP_CLASSES) -> Figure:
  """BEV segmentation: predicted probability, prediction (>= threshold) and truth per class.

  probs: [C, X, Y] sigmoid probabilities; labels: [C, X, Y] in {0, 1}; LiDAR frame, [x, y]
  indexing over [-E, E]^2 (E = half_extent). Rows: probability, thresholded prediction, truth.
  Column titles give the class IoU at `threshold` (of this example only).
  """
  probs, labels = np.asarray(probs, np.float32), np.asarray(labels) > 0
  if probs.shape != labels.shape or probs.ndim != 3 or probs.shape[0] != len(class_names):
    raise ValueError(f'predicted_vs_true_figure: probs {probs.shape} and labels {labels.shape} '
                     f'must both be [{len(class_names)}, X, Y]')
  pred = probs >= threshold
  fig = Figure(figsize=(13, 6.8), layout='constrained')
  axes = fig.subplots(3, len(class_names))
  for k, name in enumerate(class_names):
    union = np.sum(pred[k] | labels[k])
    iou = np.sum(pred[k] & labels[k]) / union if union else float('nan')
    im = _bev_image(axes[0, k], probs[k], half_extent, cmap='viridis', vmin=0, vmax=1)
    _bev_image(axes[1, k], pred[k], half_extent, cmap='gray', vmin=0, vmax=1)
    _bev_image(axes[2, k], labels[k], half_extent, cmap='gray', vmin=0, vmax=1)
    axes[0, k].set_title(f'{name}\nIoU@{threshold:g} = {iou:.2f}', fontsize=9)
    for r in range(3):
      axes[r, k].tick_params(labelsize=6)
  for r, label in enumerate(('probability', f'predicted (>= {threshold:g})', 'true')):
    axes[r, 0].set_ylabel(label)
  fig.colorbar(im, ax=axes[0, :], shrink=0.8)
  return fig


class LiveLossPlot:
  """An `on_log(step, metrics)` callback for nsmae_jax.train.train_and_evaluate.

  Records `keys` (train metrics) and their 'eval_' counterparts per step and, inside IPython,
  redraws one figure in place (a display handle updated at every log step). Outside IPython (a
  script, CI) it only records; `figure()` draws the curves at any time. With `workdir`, the
  history starts from that run's metrics.jsonl, so a re-run cell that resumes a run shows the
  whole curve; a value logged again for a step (after a resume) replaces the later ones.
  """

  def __init__(self, keys: Sequence[str] = ('loss',), title: str = '', live: bool = True,
               workdir: str | None = None):
    self.keys = tuple(keys)
    self.title = title
    self.history: dict[str, list[tuple[int, float]]] = {}
    self._handle = None
    self._live = live and _in_ipython()
    path = os.path.join(workdir, 'metrics.jsonl') if workdir else ''
    if path and os.path.isfile(path):
      import json  # pylint: disable=import-outside-toplevel
      with open(path) as f:
        for line in f:
          if line.strip():
            row = json.loads(line)
            self._record(row['step'], row)

  def _record(self, step: int, metrics: Mapping[str, float]) -> None:
    for key in self.keys:
      for name in (key, f'eval_{key}'):
        value = metrics.get(name)
        if value is not None and np.isfinite(value):
          points = [p for p in self.history.get(name, []) if p[0] < step]
          self.history[name] = points + [(int(step), float(value))]

  def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
    self._record(step, metrics)
    if self._live:
      from IPython import display  # pylint: disable=import-outside-toplevel
      image = display.Image(data=figure_png(self.figure()))
      if self._handle is None:
        self._handle = display.display(image, display_id=True)
      else:
        self._handle.update(image)

  @_default_style
  def figure(self) -> Figure:
    """The curves so far: one colour per key, train solid, eval dashed with markers (log-scale
    y when every value is positive)."""
    fig = Figure(figsize=(8, 3.4), layout='constrained')
    ax = fig.subplots()
    positive = True
    colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
    for k, key in enumerate(self.keys):
      for name, style in ((key, dict(linestyle='-')),
                          (f'eval_{key}', dict(linestyle='--', marker='o', markersize=3))):
        if name in self.history:
          steps, values = zip(*self.history[name])
          ax.plot(steps, values, color=colors[k % len(colors)], label=name, **style)
          positive &= min(values) > 0
    if self.history:
      ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
      if positive:
        ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(self.title or ', '.join(self.keys), fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _in_ipython() -> bool:
  try:
    from IPython import get_ipython  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return get_ipython() is not None


@_default_style
def figure_png(fig: Figure, dpi: int = 100) -> bytes:
  """The figure encoded as PNG bytes."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  return buf.getvalue()


def show(fig: Figure, name: str = '', save_dir: str | None = None, dpi: int = 100,
         display: bool = True) -> str | None:
  """Displays `fig` in IPython (as a PNG; display=False skips that) and writes
  `<save_dir>/<name>.png` when save_dir is given (created if needed). Returns the written path,
  or None."""
  png = figure_png(fig, dpi=dpi)
  path = None
  if save_dir:
    if not name:
      raise ValueError('show: a name is needed to save a figure into save_dir')
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, f'{name}.png')
    with open(path, 'wb') as f:
      f.write(png)
  if display and _in_ipython():
    from IPython import display as ipd  # pylint: disable=import-outside-toplevel
    ipd.display(ipd.Image(data=png))
  return path
