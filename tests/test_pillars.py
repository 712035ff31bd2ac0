"""Pillar encoder: point-order invariance, padding ignored, empty pillars zero, exact block
masking (no point of a dropped block reaches the canvas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsmae_jax.models import pillars
from nsmae_jax.models.pillars import PillarFeatureNet, block_to_pillars

CELLS, E, ZMIN, ZMAX = 16, 8.0, -3.0, 3.0

# The functions under test, jitted (grid and masking settings static): one compilation per
# call signature instead of an eager dispatch, and compilation, of every op.
pillar_ids = jax.jit(pillars.pillar_ids, static_argnums=(2, 3, 4, 5))
mask_pillars = jax.jit(pillars.mask_pillars, static_argnums=(2, 3, 4))


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
  new_ids, dropped = mask_pillars(jax.random.key(0), ids, CELLS, ratio)
  ids, new_ids = np.asarray(ids), np.asarray(new_ids)
  dropped = np.asarray(dropped).reshape(2, n)  # block = 1: one block per pillar
  for b in range(2):
    nonempty = np.zeros(n, bool)
    nonempty[ids[b][ids[b] < n]] = True
    assert dropped[b].sum() == round(ratio * nonempty.sum())
    assert not (dropped[b] & ~nonempty).any()
    kept = np.zeros(n, bool)
    kept[new_ids[b][new_ids[b] < n]] = True
    np.testing.assert_array_equal(kept, nonempty & ~dropped[b])
  # Different keys give different subsets.
  _, other = mask_pillars(jax.random.key(1), jnp.asarray(ids), CELLS, 0.5)
  _, first = mask_pillars(jax.random.key(0), jnp.asarray(ids), CELLS, 0.5)
  assert not np.array_equal(np.asarray(other), np.asarray(first))


@pytest.mark.slow  # compiles the LiDAR branch per block size (fast tier: < 2 min)
@pytest.mark.parametrize('block', [2, 4])
def test_block_masking_hides_every_point_of_a_dropped_block(pfn, block):
  """Blocks of block x block pillars (the backbone uses a fused-volume cell): the exact
  fraction of non-empty blocks is dropped, and their pillars are empty in the canvas."""
  pts, mask = _points(8)
  ids = pillar_ids(pts, mask, CELLS, E, ZMIN, ZMAX)
  new_ids, dropped = mask_pillars(jax.random.key(3), ids, CELLS, 0.5, block)
  ids, new_ids, dropped = np.asarray(ids)[0], np.asarray(new_ids)[0], np.asarray(dropped)[0]
  nb = CELLS // block
  assert dropped.shape == (nb, nb)
  valid = ids < CELLS * CELLS
  bi, bj = ids[valid] // CELLS // block, ids[valid] % CELLS // block
  nonempty = np.zeros((nb, nb), bool)
  nonempty[bi, bj] = True
  assert dropped.sum() == round(0.5 * nonempty.sum()) and not (dropped & ~nonempty).any()
  in_dropped = np.zeros_like(valid)
  in_dropped[valid] = dropped[bi, bj]
  assert in_dropped.sum() > 0 and (valid & ~in_dropped).sum() > 0
  # Points of dropped blocks go to the dump id, every other point keeps its pillar.
  np.testing.assert_array_equal(new_ids[in_dropped], CELLS * CELLS)
  np.testing.assert_array_equal(new_ids[~in_dropped], ids[~in_dropped])
  # The per-pillar mask is the block mask, pillar (i, j) in block (i // block, j // block).
  per_pillar = np.asarray(block_to_pillars(jnp.asarray(dropped)[None], block))[0]
  pi, pj = np.divmod(np.arange(CELLS * CELLS), CELLS)
  np.testing.assert_array_equal(per_pillar, dropped[pi // block, pj // block])
  # In the canvas of the masked ids, dropped blocks are all zeros, while kept points still
  # fill their pillars.
  net = PillarFeatureNet(features=16, cells=CELLS, half_extent=E)
  params = jax.jit(net.init)(jax.random.key(0), pts, jnp.asarray(ids)[None])
  apply = jax.jit(net.apply)
  canvas = np.asarray(apply(params, pts, jnp.asarray(new_ids)[None]))[0]
  up = np.repeat(np.repeat(dropped, block, 0), block, 1)
  assert np.all(canvas[up] == 0.0)
  kept_pillar = np.zeros(CELLS * CELLS, bool)
  kept_pillar[new_ids[new_ids < CELLS * CELLS]] = True
  assert np.all(np.abs(canvas.reshape(-1, 16)[kept_pillar]).sum(-1) > 0)
  # Moving the points inside dropped blocks (same blocks, so the same mask) changes nothing.
  moved = pts.copy()
  moved[0, in_dropped, 2] = np.clip(moved[0, in_dropped, 2] + 0.5, ZMIN, ZMAX)
  ids_moved, _ = mask_pillars(jax.random.key(3), pillar_ids(moved, mask, CELLS, E, ZMIN, ZMAX),
                              CELLS, 0.5, block)
  np.testing.assert_array_equal(apply(params, moved, ids_moved), canvas[None])
