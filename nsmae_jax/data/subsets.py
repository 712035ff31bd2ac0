"""Which training key frames keep their labels at a label fraction (one formula, used by the
input pipeline and by the label-efficiency report)."""

from __future__ import annotations

import numpy as np


def subset_size(total: int, fraction: float) -> int:
  """Labelled key frames out of `total` at `fraction` in (0, 1]: max(1, round(f N)); N at 1."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'label_fraction must be in (0, 1], got {fraction}')
  return total if fraction >= 1.0 else max(1, int(round(fraction * total)))


def labelled_subset(total: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices (into the split's stored order) of the labelled key frames: a seeded,
  deterministic subset of subset_size(total, fraction); all of them at fraction 1."""
  keep = subset_size(total, fraction)
  if keep == total:
    return np.arange(total)
  return np.sort(np.random.default_rng([seed, total]).permutation(total)[:keep])
