"""Pillar encoder: point-order invariance, padding ignored, empty pillars zero, exact masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsmae_jax.models.pillars import PillarFeatureNet, mask_pillars, pillar_ids

CELLS, E, ZMIN, ZMAX = 16, 8.0, -3.0, 3.0


def _points(seed, n=600, n_valid=450):
  rng = np.random.default_rng(seed)
  # Clustered in a few pillars so that many pillars stay empty.
  centres = rng.uniform(-E, E, size=(12, 2))
  xy = centres[rng.integers(0, 12, n)] + rng.normal(0, 0.4, size=(n, 2))
  pts = np.concatenate([xy, rng.uniform(ZMIN, ZMAX, (n, 1)), rng.uniform(0, 1, (n, 2))], -1)
  mask = np.arange(n) < n_valid
  return pts.astype(np.float32)[None], mask[None]


@pytest.fixture(scope='module')
def pfn():
  net = PillarFeatureNet(features=16, cells=CELLS, half_extent=E)
  pts, mask = _points(0)
  ids = pillar_ids(pts, mask, CELLS, E, ZMIN, ZMAX)
  params = jax.jit(net.init)(jax.random.key(0), pts, ids)

  @jax.jit
  def apply(pts, mask):
    return net.apply(params, pts, pillar_ids(pts, mask, CELLS, E, ZMIN, ZMAX))
  return apply


def test_invariant_to_point_order(pfn):
  pts, mask = _points(1)
  perm = np.random.default_rng(2).permutation(pts.shape[1])
  np.testing.assert_allclose(pfn(pts, mask), pfn(pts[:, perm], mask[:, perm]), rtol=1e-5,
                             atol=1e-5)


def test_padded_points_are_ignored(pfn):
  pts, mask = _points(3)
  other = pts.copy()
  other[~mask] = np.random.default_rng(4).normal(0, 5, size=other[~mask].shape)
  np.testing.assert_array_equal(pfn(pts, mask), pfn(other, mask))
  # ... while changing a valid point does change the canvas (the test can fail).
  moved = pts.copy()
  moved[0, 0, 2] += 1.0
  assert not np.allclose(pfn(pts, mask), pfn(moved, mask))


def test_empty_pillars_are_zero(pfn):
  pts, mask = _points(5)
  canvas = np.asarray(pfn(pts, mask))[0]                      # [cells, cells, C]
  ids = np.asarray(pillar_ids(pts, mask, CELLS, E, ZMIN, ZMAX))[0]
  occupied = np.zeros(CELLS * CELLS, bool)
  occupied[ids[ids < CELLS * CELLS]] = True
  occupied = occupied.reshape(CELLS, CELLS)
  assert (~occupied).sum() > 10 and occupied.sum() > 10
  assert np.all(canvas[~occupied] == 0.0)
  assert np.all(np.abs(canvas[occupied]).sum(-1) > 0)


def test_pillar_ids_follow_the_xy_grid_and_drop_outside_points():
  pts = np.array([[[-7.9, -7.9, 0.0], [7.9, -7.9, 0.0], [-7.9, 0.1, 0.0], [9.0, 0, 0],
                   [0, 0, 3.5]]], np.float32)
  ids = np.asarray(pillar_ids(pts, np.ones((1, 5), bool), CELLS, E, ZMIN, ZMAX))[0]
  np.testing.assert_array_equal(ids, [0, 15 * CELLS, 8, CELLS * CELLS, CELLS * CELLS])


@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.8, 0.9])
def test_masking_drops_the_exact_fraction_of_non_empty_pillars(ratio):
  pts, mask = _points(6)
  pts2, mask2 = _points(7, n_valid=200)
  ids = pillar_ids(np.concatenate([pts, pts2]), np.concatenate([mask, mask2]), CELLS, E, ZMIN,
                   ZMAX)
  n = CELLS * CELLS
  new_ids, dropped = jax.jit(mask_pillars, static_argnums=(2, 3))(jax.random.key(0), ids, n,
                                                                    ratio)
  ids, new_ids, dropped = np.asarray(ids), np.asarray(new_ids), np.asarray(dropped)
  for b in range(2):
    nonempty = np.zeros(n, bool)
    nonempty[ids[b][ids[b] < n]] = True
    assert dropped[b].sum() == round(ratio * nonempty.sum())
    assert not (dropped[b] & ~nonempty).any()
    kept = np.zeros(n, bool)
    kept[new_ids[b][new_ids[b] < n]] = True
    np.testing.assert_array_equal(kept, nonempty & ~dropped[b])
  # Different keys give different subsets.
  _, other = mask_pillars(jax.random.key(1), jnp.asarray(ids), n, 0.5)
  _, first = mask_pillars(jax.random.key(0), jnp.asarray(ids), n, 0.5)
  assert not np.array_equal(np.asarray(other), np.asarray(first))
