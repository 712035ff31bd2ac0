"""The labelled subset: its size formula and its determinism (same as the first wave's)."""

import numpy as np
import pytest

from nsmae_jax.data.subsets import labelled_subset, subset_size


def test_subset_size_formula():
  assert [subset_size(200, f) for f in (0.001, 0.01, 0.05, 0.1, 1.0)] == [1, 2, 10, 20, 200]
  with pytest.raises(ValueError, match='label_fraction'):
    subset_size(10, 0.0)


def test_labelled_subset_is_seeded_sorted_and_nested_in_size():
  a = labelled_subset(100, 0.1, seed=3)
  np.testing.assert_array_equal(a, labelled_subset(100, 0.1, seed=3))
  assert len(a) == 10 and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, labelled_subset(100, 0.1, seed=4))
  # The same permutation prefix: a larger fraction keeps every frame of a smaller one.
  assert set(a) <= set(labelled_subset(100, 0.2, seed=3))
  np.testing.assert_array_equal(labelled_subset(7, 1.0, seed=0), np.arange(7))
