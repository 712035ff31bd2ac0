"""BEV map segmentation IoU as BEVFusion computes it (mmdet3d BEVFusion `evaluate_map`).

Per class c and threshold t in THRESHOLDS (0.35 .. 0.65 step 0.05), a cell is predicted positive
when its sigmoid probability >= t. TP/FP/FN are summed over every cell of every example of the
whole split *before* dividing (not a mean of per-example IoUs); IoU[c, t] = TP / (TP + FP + FN +
1e-7); the class score is max_t IoU[c, t]; mIoU is the mean of the class scores.

Arrays are [..., C, X, Y] (class first, BEV cells indexed [x, y] in the LiDAR frame, as
`bev_map`); only the class axis position matters here.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from nsmae_jax.data.schema import MAP_CLASSES
# BEVFusion's sweep; rounded so that 0.35 + k * 0.05 does not drift in float.
THRESHOLDS = tuple(round(0.35 + 0.05 * k, 2) for k in range(7))
EPS = 1e-7


def confusion_counts(probs: jnp.ndarray, labels: jnp.ndarray,
                     thresholds=THRESHOLDS) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """TP, FP, FN per class and threshold, each float32 [C, T].

  Args:
    probs: float [..., C, X, Y] sigmoid probabilities.
    labels: [..., C, X, Y] ground truth (non-zero = positive).
    thresholds: T thresholds; predicted positive where probs >= t.
  Sums over every axis but C (leading batch axes included). Works on numpy and jnp arrays
  (inside jit too).
  """
  if probs.shape != labels.shape:
    raise ValueError(f'probs {probs.shape} and labels {labels.shape} differ in shape')
  c = probs.shape[-3]
  p = jnp.moveaxis(probs.reshape((-1,) + probs.shape[-3:]), -3, 0).reshape(c, -1)
  y = jnp.moveaxis(labels.reshape((-1,) + labels.shape[-3:]), -3, 0).reshape(c, -1) != 0
  t = jnp.asarray(thresholds, jnp.float32)
  # [C, N] x [T] -> counts [C, T]; computed as matmuls over N (no [C, N, T] buffer needed).
  pos = (p[:, :, None] >= t).astype(jnp.float32)  # [C, N, T]
  yf = y.astype(jnp.float32)
  tp = jnp.einsum('cnt,cn->ct', pos, yf)
  fp = jnp.sum(pos, axis=1) - tp
  fn = jnp.sum(yf, axis=1)[:, None] - tp
  return tp, fp, fn


def iou_table(tp, fp, fn) -> np.ndarray:
  """IoU [C, T] = TP / (TP + FP + FN + 1e-7) from split-summed counts."""
  tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
  return tp / (tp + fp + fn + EPS)


def summarize(tp, fp, fn, classes=MAP_CLASSES, thresholds=THRESHOLDS) -> dict[str, float]:
  """Split-summed counts [C, T] -> {'miou', 'iou/<class>', 'thr/<class>'} (max over thresholds).

  'thr/<class>' is the threshold that attains the max (the first one on ties).
  """
  ious = iou_table(tp, fp, fn)
  if ious.shape != (len(classes), len(thresholds)):
    raise ValueError(f'counts have shape {ious.shape}, expected '
                     f'({len(classes)}, {len(thresholds)})')
  best = ious.max(axis=1)
  out = {'miou': float(best.mean())}
  for k, name in enumerate(classes):
    out[f'iou/{name}'] = float(best[k])
    out[f'thr/{name}'] = float(thresholds[int(ious[k].argmax())])
  return out


def format_table(summary: Mapping[str, float], classes=MAP_CLASSES) -> str:
  """A per-class text table (IoU in %, best threshold) plus the mIoU line."""
  lines = [f'{"class":<15} {"IoU":>6}  thr']
  for name in classes:
    lines.append(f'{name:<15} {100 * summary[f"iou/{name}"]:6.2f}  '
                 f'{summary[f"thr/{name}"]:.2f}')
  lines.append(f'{"mIoU":<15} {100 * summary["miou"]:6.2f}')
  return '\n'.join(lines)


# ---- flat scalar encoding: the loop's eval_step sums scalar per-example metrics ----

def flatten_counts(tp, fp, fn) -> dict[str, jnp.ndarray]:
  """{'tp_c_t': scalar, 'fp_c_t', 'fn_c_t'} for every class c and threshold index t."""
  out = {}
  for name, a in (('tp', tp), ('fp', fp), ('fn', fn)):
    for c in range(a.shape[0]):
      for t in range(a.shape[1]):
        out[f'{name}_{c}_{t}'] = a[c, t]
  return out


def unflatten_counts(sums: Mapping[str, np.ndarray], num_classes: int = len(MAP_CLASSES),
                     num_thresholds: int = len(THRESHOLDS)) -> tuple[np.ndarray, ...]:
  """Inverse of flatten_counts over summed metrics; also accepts arrays 'tp'/'fp'/'fn' [C, T]."""
  if all(k in sums and np.ndim(sums[k]) == 2 for k in ('tp', 'fp', 'fn')):
    return tuple(np.asarray(sums[k], np.float64) for k in ('tp', 'fp', 'fn'))
  out = []
  for name in ('tp', 'fp', 'fn'):
    a = np.zeros((num_classes, num_thresholds))
    for c in range(num_classes):
      for t in range(num_thresholds):
        key = f'{name}_{c}_{t}'
        if key not in sums:
          raise KeyError(f'eval sums lack {key!r} (have {sorted(sums)[:8]}...)')
        a[c, t] = float(sums[key])
    out.append(a)
  return tuple(out)
