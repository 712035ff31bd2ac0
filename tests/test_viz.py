"""nsmae_jax.viz: LiDAR overlay, BEV orientation, masked depth, IoU titles, loss plot, saving."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import tiny_config

from nsmae_jax import viz
from nsmae_jax.data.fake import fake_batch

E = 32.0


def _example(seed=0):
  return {k: v[0] for k, v in fake_batch(tiny_config(), 1, seed=seed).items()}


def _front_back_rig(h=32, w=88, focal=70.0):
  """intrinsics [6, 3, 3] and cam2lidar [6, 4, 4]: camera 0 at (0, 0.5, -0.3) looking along +y
  (x_cam = +x, y_cam = -z, z_cam = +y, as nuScenes mounts CAM_FRONT), camera 3 the same turned
  by 180 degrees about z (CAM_BACK); the others look straight up, where no test point lies."""
  intr = np.tile(np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]], np.float32), (6, 1, 1))
  front = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float32)   # columns: cam axes
  up = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  turn = np.diag([-1.0, -1.0, 1.0]).astype(np.float32)
  c2l = np.tile(np.eye(4, dtype=np.float32), (6, 1, 1))
  for k in range(6):
    c2l[k, :3, :3] = {0: front, 3: turn @ front}.get(k, up)
  c2l[0, :3, 3] = (0.0, 0.5, -0.3)
  c2l[3, :3, 3] = (0.0, -0.5, -0.3)
  return intr, c2l


def test_project_lidar_puts_a_point_ahead_of_cam_front_at_the_principal_point():
  h, w = 32, 88
  intr, c2l = _front_back_rig(h, w)
  ahead = np.array([0.0, 0.5 + 12.0, -0.3], np.float32)
  behind = np.array([1.4, -13.5, -0.3], np.float32)   # 13 m behind CAM_BACK, 1.4 m to its left
  points = np.stack([ahead, behind, ahead])           # the 3rd is padding
  mask = np.array([True, True, False])
  projected = viz.project_lidar(points, mask, intr, c2l, (h, w))
  uv, depth = projected[0]
  np.testing.assert_allclose(uv, [[w / 2, h / 2]], atol=1e-3)
  np.testing.assert_allclose(depth, [12.0], atol=1e-4)
  # CAM_BACK's x_cam is -x of the LiDAR: a point at +x appears left of its centre.
  uv_back, depth_back = projected[3]
  np.testing.assert_allclose(depth_back, [13.0], atol=1e-4)
  np.testing.assert_allclose(uv_back, [[w / 2 - 70.0 * 1.4 / 13.0, h / 2]], atol=1e-3)
  # Nobody else sees either point; the padded duplicate is never drawn.
  assert [len(d) for _, d in projected] == [1, 0, 0, 1, 0, 0]


def test_project_lidar_drops_points_nearer_than_min_depth():
  intr, c2l = _front_back_rig()
  near = np.array([[0.0, 0.5 + 0.8, -0.3]], np.float32)  # 0.8 m in front of CAM_FRONT
  args = (near, np.array([True]), intr, c2l, (32, 88))
  assert len(viz.project_lidar(*args, min_depth=1.0)[0][1]) == 0
  assert len(viz.project_lidar(*args, min_depth=0.5)[0][1]) == 1


def test_camera_lidar_figure_lays_out_cameras_like_the_devkit_and_counts_points():
  ex = _example()
  fig = viz.camera_lidar_figure(ex)
  h, w = ex['images'].shape[1:3]
  counts = [len(d) for _, d in viz.project_lidar(ex['points'], ex['points_mask'],
                                                 ex['intrinsics'], ex['cam2lidar'], (h, w))]
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  order = [2, 0, 1, 4, 3, 5]  # front-left, front, front-right / back-left, back, back-right
  assert titles == [f'{viz.CAMERAS[c]} ({counts[c]} pts)' for c in order]
  assert sum(counts) > 0
  # Each panel's scatter holds exactly the projected points of its camera.
  panels = [ax for ax in fig.axes if ax.get_title()]
  assert [len(ax.collections[0].get_offsets()) for ax in panels] == [counts[c] for c in order]


def test_camera_lidar_figure_rejects_a_batched_example():
  ex = fake_batch(tiny_config(), 1)
  with pytest.raises(ValueError, match=r'images must be \[6, H, W, 3\], got \(1, 6'):
    viz.camera_lidar_figure(ex)


def test_bev_map_figure_draws_x_right_and_forward_up():
  bev = np.zeros((6, 8, 8), np.uint8)
  bev[0, 7, 0] = 1   # x max (right), y min (behind): bottom-right when drawn
  bev[1, 0, 7] = 1   # x min (left), y max (ahead): top-left
  fig = viz.bev_map_figure(bev, E)
  img0 = fig.axes[0].images[0]
  img1 = fig.axes[1].images[0]
  assert img0.origin == 'lower' and tuple(img0.get_extent()) == (-E, E, -E, E)
  a0, a1 = np.asarray(img0.get_array()), np.asarray(img1.get_array())  # [rows = y, cols = x]
  assert a0[0, 7] and a0.sum() == 1      # row 0 is the bottom with origin='lower'
  assert a1[7, 0] and a1.sum() == 1
  assert fig.axes[0].get_title() == 'drivable_area (2%)'


def test_figures_ignore_the_global_style_the_devkit_sets():
  import matplotlib.style  # pylint: disable=import-outside-toplevel
  with matplotlib.style.context('seaborn-v0_8-whitegrid'):  # what nuscenes.map_expansion sets
    fig = viz.bev_map_figure(np.zeros((6, 4, 4)), E)
    viz.figure_png(fig)
  assert not any(line.get_visible() for ax in fig.axes for line in ax.get_xgridlines())


def test_bev_map_figure_names_the_expected_shape():
  with pytest.raises(ValueError, match=r'bev_map must be \[6, X, Y\], got \(1, 6, 8, 8\)'):
    viz.bev_map_figure(np.zeros((1, 6, 8, 8)), E)


def _views(h=4, w=6, n=5):
  rng = np.random.default_rng(0)
  pd_t = np.zeros((h, w), np.float32)
  pd_t[1, 2] = 7.0
  bd_t = np.zeros((n, n), np.float32)
  bd_t[3, 1] = 2.0
  return dict(perspective_color=rng.uniform(size=(h, w, 3)),
              perspective_color_target=rng.uniform(size=(h, w, 3)),
              perspective_depth=np.full((h, w), 5.0), perspective_depth_target=pd_t,
              bev_color=rng.uniform(size=(n, n, 3)), bev_color_target=rng.uniform(size=(n, n, 3)),
              bev_depth=np.full((n, n), 1.0), bev_depth_target=bd_t)


def test_rendered_vs_target_masks_missing_depth_targets():
  fig = viz.rendered_vs_target_figure(_views(), E)
  image_axes = [ax for ax in fig.axes if ax.images]
  assert len(image_axes) == 8
  persp_target = image_axes[3].images[0].get_array()
  assert np.ma.count(persp_target) == 1 and persp_target[1, 2] == 7.0
  bev_target = image_axes[7].images[0].get_array()   # drawn transposed: [y, x]
  assert np.ma.count(bev_target) == 1 and bev_target[1, 3] == 2.0
  # Rendered and target depth share the scale set by the target.
  assert image_axes[2].images[0].get_clim() == image_axes[3].images[0].get_clim()


def test_rendered_vs_target_names_missing_views():
  views = _views()
  del views['bev_depth_target']
  with pytest.raises(KeyError, match='bev_depth_target'):
    viz.rendered_vs_target_figure(views, E)


def test_predicted_vs_true_reports_the_class_iou_at_the_threshold():
  probs = np.zeros((6, 4, 4), np.float32)
  labels = np.zeros((6, 4, 4), np.uint8)
  probs[0, 0, :2] = 0.9          # predicted: 2 cells
  labels[0, 0, 1:4] = 1          # true: 3 cells, 1 shared -> IoU 1 / 4
  probs[1, 0, 0] = 0.49          # just below the threshold: empty prediction, empty truth
  fig = viz.predicted_vs_true_figure(probs, labels, E, threshold=0.5)
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert titles[0] == 'drivable_area\nIoU@0.5 = 0.25'
  assert titles[1] == 'ped_crossing\nIoU@0.5 = nan'
  with pytest.raises(ValueError, match=r'probs \(6, 4, 4\) and labels \(6, 4, 5\)'):
    viz.predicted_vs_true_figure(probs, np.zeros((6, 4, 5)), E)


def test_live_loss_plot_records_train_and_eval_values_and_skips_non_finite():
  plot = viz.LiveLossPlot(('loss', 'bev_color_loss'))
  plot(1, {'loss': 2.0, 'bev_color_loss': 0.5, 'grad_norm': 3.0})
  plot(2, {'loss': float('nan'), 'bev_color_loss': 0.25})
  plot(2, {'eval_loss': 1.5})
  assert plot.history == {'loss': [(1, 2.0)], 'bev_color_loss': [(1, 0.5), (2, 0.25)],
                          'eval_loss': [(2, 1.5)]}
  ax = plot.figure().axes[0]
  assert sorted(line.get_label() for line in ax.lines) == ['bev_color_loss', 'eval_loss', 'loss']
  assert ax.get_yscale() == 'log'


def test_live_loss_plot_starts_from_a_resumed_runs_metrics_and_replaces_relogged_steps(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  rows = [{'step': 2, 'loss': 3.0}, {'step': 4, 'loss': 2.0}, {'step': 4, 'eval_loss': 2.5},
          {'step': 6, 'loss': 1.0}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  plot = viz.LiveLossPlot(('loss',), workdir=str(tmp_path))
  assert plot.history == {'loss': [(2, 3.0), (4, 2.0), (6, 1.0)], 'eval_loss': [(4, 2.5)]}
  plot(6, {'loss': 0.5})   # resumed from step 4: step 6 is logged again
  assert plot.history['loss'] == [(2, 3.0), (4, 2.0), (6, 0.5)]
  assert viz.LiveLossPlot(workdir=str(tmp_path / 'none')).history == {}


def test_show_writes_a_png_and_needs_a_name_to_save(tmp_path):
  fig = viz.LiveLossPlot().figure()
  path = viz.show(fig, 'curve', str(tmp_path / 'figs'))
  assert path == str(tmp_path / 'figs' / 'curve.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert viz.show(fig) is None
  with pytest.raises(ValueError, match='a name is needed'):
    viz.show(fig, '', str(tmp_path))
  assert os.listdir(tmp_path / 'figs') == ['curve.png']


def test_example_from_batch_picks_device_and_index_and_drops_strings():
  b0, b1 = fake_batch(tiny_config(), 2, seed=0), fake_batch(tiny_config(), 2, seed=1)
  host = {k: np.stack([b0[k], b1[k]]) for k in b0}     # [D=2, B=2, ...]
  host['token'] = np.array([['a', 'b'], ['c', 'd']])
  ex = viz.example_from_batch(host, device=1, index=1)
  assert 'token' not in ex
  np.testing.assert_array_equal(ex['images'], b1['images'][1])
  assert viz.per_device_batch(host, device=1)['points'].shape == b1['points'].shape
