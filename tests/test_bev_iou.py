"""BEVFusion's BEV map IoU: hand-computed TP/FP/FN, the threshold sweep, split-level sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsmae_jax.finetune import metrics as m


def _grid(values, c=1):
  """A [1, c, 1, N] array from a flat list (one class, one row of cells)."""
  return np.asarray(values, np.float32).reshape(1, c, 1, -1)


def test_thresholds_are_bevfusions():
  assert m.THRESHOLDS == (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)


def test_counts_by_hand_across_the_threshold_sweep():
  # cells:   a     b     c     d     e     f
  probs = [0.90, 0.50, 0.38, 0.62, 0.10, 0.35]
  label = [1,    1,    0,    0,    1,    1]
  tp, fp, fn = m.confusion_counts(_grid(probs), _grid(label))
  # threshold: 0.35 .40 .45 .50 .55 .60 .65   (>= t is positive; 0.35 counts at 0.35)
  np.testing.assert_array_equal(tp[0], [3, 2, 2, 2, 1, 1, 1])  # a, b, f | a, b | ... | a
  np.testing.assert_array_equal(fp[0], [2, 1, 1, 1, 1, 1, 0])  # c, d | d | ... | d | none
  np.testing.assert_array_equal(fn[0], [1, 2, 2, 2, 3, 3, 3])
  ious = m.iou_table(tp, fp, fn)[0]
  np.testing.assert_allclose(ious, [3 / 6, 2 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 1 / 4], atol=1e-6)
  # The class score is the max over the sweep: 0.5 at threshold 0.35.
  s = m.summarize(tp, fp, fn, classes=('x',))
  assert s['iou/x'] == pytest.approx(0.5, abs=1e-6)
  assert s['thr/x'] == 0.35


def test_best_threshold_can_be_high():
  probs = [0.64, 0.66, 0.9]   # only a threshold above 0.64 removes the false positive
  label = [0, 1, 1]
  s = m.summarize(*m.confusion_counts(_grid(probs), _grid(label)), classes=('x',))
  assert s['iou/x'] == pytest.approx(1.0, abs=1e-6)
  assert s['thr/x'] == 0.65


def test_counts_sum_over_the_split_not_a_mean_of_ious():
  # Example 1: 1 TP, 0 FP, 0 FN (IoU 1); example 2: 1 TP, 3 FP, 0 FN (IoU 0.25).
  probs = np.array([[0.9, 0.1, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9]], np.float32)
  label = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], np.float32)
  tp, fp, fn = m.confusion_counts(probs.reshape(2, 1, 1, 4), label.reshape(2, 1, 1, 4))
  assert (tp[0, 3], fp[0, 3], fn[0, 3]) == (2, 3, 0)
  s = m.summarize(tp, fp, fn, classes=('x',))
  assert s['iou/x'] == pytest.approx(2 / 5, abs=1e-6)  # not (1 + 0.25) / 2


def test_miou_is_the_mean_of_per_class_maxima_and_classes_stay_separate():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(3, 6, 8, 8)).astype(np.float32)
  labels = (rng.uniform(size=(3, 6, 8, 8)) > 0.6).astype(np.uint8)
  tp, fp, fn = m.confusion_counts(probs, labels)
  assert tp.shape == (6, 7)
  s = m.summarize(tp, fp, fn)
  for c, name in enumerate(m.MAP_CLASSES):
    p, y = probs[:, c].ravel(), labels[:, c].ravel() > 0
    best = max(np.sum((p >= t) & y) / (np.sum((p >= t) | y) + 1e-7) for t in m.THRESHOLDS)
    assert s[f'iou/{name}'] == pytest.approx(best, abs=1e-6)
  assert s['miou'] == pytest.approx(np.mean([s[f'iou/{n}'] for n in m.MAP_CLASSES]))


def test_empty_class_scores_zero_not_nan():
  tp, fp, fn = m.confusion_counts(_grid([0.1, 0.2]), _grid([0, 0]))
  s = m.summarize(tp, fp, fn, classes=('x',))
  assert s['iou/x'] == 0.0


def test_jit_and_flat_encoding_round_trip():
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=(2, 6, 4, 4)).astype(np.float32)
  labels = (rng.uniform(size=(2, 6, 4, 4)) > 0.5).astype(np.uint8)
  eager = m.confusion_counts(probs, labels)
  jitted = jax.jit(m.confusion_counts)(jnp.asarray(probs), jnp.asarray(labels))
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  flat = {k: np.asarray(v) for k, v in m.flatten_counts(*eager).items()}
  assert len(flat) == 3 * 6 * 7
  for a, b in zip(eager, m.unflatten_counts(flat)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(KeyError, match='tp_0_0'):
    m.unflatten_counts({})


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='differ in shape'):
    m.confusion_counts(np.zeros((1, 6, 4, 4)), np.zeros((1, 6, 4, 5)))


def test_format_table_lists_every_class():
  s = m.summarize(np.ones((6, 7)), np.zeros((6, 7)), np.ones((6, 7)))
  text = m.format_table(s)
  for name in m.MAP_CLASSES:
    assert name in text
  assert 'mIoU' in text and '50.00' in text
