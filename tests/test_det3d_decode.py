"""Detection head pieces against hand-built maps and closed forms: decoding (local max, top-k,
box geometry, circle NMS), targets (Gaussian peaks, regression at the centre cell) and the
focal / L1 losses."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nsmae_jax.data.schema import DETECTION_CLASSES
from nsmae_jax.finetune import det3d

# The functions under test, jitted (grid and decoding settings static): one compilation per
# call signature instead of an eager dispatch, and compilation, of every op.
decode = jax.jit(det3d.decode, static_argnames=('half_extent', 'resolution', 'top_k',
                                                'score_threshold', 'nms'))
center_targets = jax.jit(det3d.center_targets, static_argnames=('half_extent', 'resolution',
                                                                'cells'))
focal_loss = jax.jit(det3d.focal_loss)
regression_loss = jax.jit(det3d.regression_loss)

CAR, PED = DETECTION_CLASSES.index('car'), DETECTION_CLASSES.index('pedestrian')
E, R, N = 8.0, 1.0, 16  # grid: 16 x 16 cells of 1 m over [-8, 8]^2


def _maps(peaks):
  """peaks: [(i, j, class, logit, regression[10])] -> (heatmap logits [N, N, C], reg [N, N, 10])."""
  heat = np.full((N, N, len(DETECTION_CLASSES)), -10.0, np.float32)
  reg = np.zeros((N, N, 10), np.float32)
  for i, j, c, logit, values in peaks:
    heat[i, j, c] = logit
    reg[i, j] = values
  return heat, reg


def _reg(off, z, lwh, yaw, vel):
  return [*off, z, *np.log(lwh), np.sin(yaw), np.cos(yaw), *vel]


def test_hand_built_maps_decode_to_the_expected_boxes():
  heat, reg = _maps([
      (3, 5, CAR, 4.0, _reg((0.25, 0.75), -1.2, (4.5, 1.9, 1.6), 0.7, (2.0, -1.0))),
      (12, 10, PED, 2.0, _reg((0.5, 0.1), -0.8, (0.7, 0.6, 1.8), -2.5, (0.3, 1.1))),
  ])
  dets = decode(heat, reg, half_extent=E, resolution=R, top_k=5, score_threshold=0.1)
  valid = np.asarray(dets.valid)
  assert valid.tolist() == [True, True, False, False, False]
  want = np.array([[-8 + 3.25, -8 + 5.75, -1.2, 4.5, 1.9, 1.6, 0.7, 2.0, -1.0],
                   [-8 + 12.5, -8 + 10.1, -0.8, 0.7, 0.6, 1.8, -2.5, 0.3, 1.1]], np.float32)
  np.testing.assert_allclose(np.asarray(dets.boxes)[:2], want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dets.scores)[:2], 1 / (1 + np.exp([-4.0, -2.0])),
                             atol=1e-6)
  assert np.asarray(dets.labels)[:2].tolist() == [CAR, PED]


def test_local_max_and_circle_nms_suppress_only_same_class_neighbours():
  values = _reg((0.5, 0.5), 0.0, (4.5, 1.9, 1.6), 0.0, (0.0, 0.0))
  heat, reg = _maps([
      (3, 5, CAR, 4.0, values),
      (4, 5, CAR, 3.0, values),    # adjacent, lower: not a local maximum
      (6, 5, CAR, 2.0, values),    # 3 m from the first car: circle NMS (car 4 m^2) keeps it
      (6, 6, PED, 1.0, values),    # at ~1.4 m from that car but a pedestrian: kept
      (10, 10, CAR, 1.5, values),
      (11, 11, CAR, 0.5, values),  # diagonal neighbour: not a local maximum either
  ])
  dets = decode(heat, reg, half_extent=E, resolution=R, top_k=8, score_threshold=0.05)
  kept = np.asarray(dets.valid)
  xy = np.asarray(dets.boxes)[kept, :2]
  assert sorted(map(tuple, np.round(xy, 3))) == sorted([
      (-4.5, -2.5), (-1.5, -2.5), (-1.5, -1.5), (2.5, 2.5)])
  # With a 0.5 m grid the same cells are 1 m apart: the lower car is now within CenterPoint's
  # 2 m car radius and goes; the pedestrian stays.
  dets = decode(heat, reg, half_extent=E / 2, resolution=0.5, top_k=8, score_threshold=0.05)
  kept = np.asarray(dets.valid)
  labels = np.asarray(dets.labels)[kept]
  assert (labels == CAR).sum() == 2 and (labels == PED).sum() == 1
  dets = decode(heat, reg, half_extent=E / 2, resolution=0.5, top_k=8, score_threshold=0.05,
                nms='none')
  labels = np.asarray(dets.labels)[np.asarray(dets.valid)]
  assert (labels == CAR).sum() == 3 and (labels == PED).sum() == 1


def test_targets_decode_back_to_the_boxes():
  """Targets drawn from boxes, turned into maps (peak logit where the heatmap is 1), decode to
  the same boxes: targets and decoding agree on the grid convention."""
  boxes = np.array([[-4.3, 2.6, -1.0, 4.4, 1.8, 1.5, 0.3, 3.0, 0.5],
                    [5.9, -6.2, -0.5, 0.7, 0.6, 1.7, -1.9, 0.0, 1.2],
                    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],       # padding
                    [30.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]],     # off the grid
                   np.float32)
  labels = np.array([CAR, PED, CAR, CAR], np.int32)
  mask = np.array([True, True, False, True])
  t = center_targets(boxes, labels, mask, half_extent=E, resolution=R, cells=N)
  assert np.asarray(t.valid).tolist() == [True, True, False, False]
  heat = np.asarray(t.heatmap)
  assert heat[3, 10, CAR] == 1.0 and heat[13, 1, PED] == 1.0 and np.sum(heat == 1.0) == 2
  # CenterPoint's Gaussian: min radius 2 cells -> sigma 5/6; zero beyond the window.
  np.testing.assert_allclose(heat[4, 10, CAR], np.exp(-1 / (2 * (5 / 6) ** 2)), rtol=1e-6)
  assert heat[6, 10, CAR] == 0.0 and heat[3, 10, PED] == 0.0
  logits = np.log(np.clip(heat, 1e-6, 1 - 1e-6) / np.clip(1 - heat, 1e-6, None))
  reg = np.zeros((N, N, 10), np.float32)
  cells = np.asarray(t.cell)
  for m in range(2):
    reg[cells[m, 0], cells[m, 1]] = np.asarray(t.regression)[m]
  dets = decode(logits, reg, half_extent=E, resolution=R, top_k=4, score_threshold=0.9)
  got = np.asarray(dets.boxes)[np.asarray(dets.valid)]
  assert got.shape == (2, 9)
  np.testing.assert_allclose(got[np.argsort(got[:, 0])], boxes[:2][np.argsort(boxes[:2, 0])],
                             atol=1e-4)


def test_focal_and_regression_losses_match_closed_forms():
  target = np.zeros((2, 2, 1), np.float32)
  target[0, 0, 0], target[1, 1, 0] = 1.0, 0.5
  logits = np.array([[[1.0], [-1.0]], [[0.0], [2.0]]], np.float32)
  p = 1 / (1 + np.exp(-logits))
  want = -(np.log(p[0, 0, 0]) * (1 - p[0, 0, 0]) ** 2
           + np.log(1 - p[0, 1, 0]) * p[0, 1, 0] ** 2
           + np.log(1 - p[1, 0, 0]) * p[1, 0, 0] ** 2
           + np.log(1 - p[1, 1, 0]) * p[1, 1, 0] ** 2 * 0.5 ** 4) / 1.0
  np.testing.assert_allclose(focal_loss(logits, target), want, rtol=1e-5)

  boxes = np.array([[-4.3, 2.6, -1.0, 4.4, 1.8, 1.5, 0.3, 3.0, 0.5]], np.float32)
  t = center_targets(boxes, np.array([CAR]), np.array([True]), half_extent=E, resolution=R,
                     cells=N)
  reg = np.zeros((N, N, 10), np.float32)
  reg[3, 10] = np.asarray(t.regression)[0] + 0.1  # every channel 0.1 off at the centre cell
  weights = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0.2, 0.2])
  np.testing.assert_allclose(regression_loss(reg, t), 0.1 * weights.sum() / (1 + 1e-4),
                             rtol=1e-4)


def test_unknown_nms_names_the_flag():
  heat, reg = _maps([])
  with pytest.raises(ValueError, match='--det_nms'):
    decode(heat, reg, half_extent=E, resolution=R, top_k=2, nms='rotated')
