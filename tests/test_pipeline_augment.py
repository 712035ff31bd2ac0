"""Global augmentation keeps points, boxes, BEV masks and cameras consistent; the pipeline runs
on the converted synthetic world with and without it."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import math

import numpy as np
import pytest

from helpers import tiny_config
from nsmae_jax.data import augment

E, R = 4.0, 0.5  # a small BEV grid: 16 x 16 cells


def _example(seed=0):
  rng = np.random.default_rng(seed)
  n = int(2 * E / R)
  cam2lidar = np.tile(np.eye(4, dtype=np.float32), (6, 1, 1))
  for k in range(6):
    c, s = math.cos(k), math.sin(k)
    cam2lidar[k, :3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, 0, 1], [0, -1, 0]])
    cam2lidar[k, :3, 3] = rng.normal(size=3)
  return {
      'points': np.concatenate([rng.normal(scale=3, size=(50, 3)), rng.uniform(size=(50, 2))],
                               axis=1).astype(np.float32),
      'cam2lidar': cam2lidar,
      'boxes': np.concatenate([rng.normal(scale=3, size=(7, 3)), rng.uniform(1, 4, (7, 3)),
                               rng.uniform(-3, 3, (7, 1)), rng.normal(size=(7, 2))],
                              axis=1).astype(np.float32),
      'bev_map': (rng.uniform(size=(6, n, n)) > 0.5).astype(np.uint8),
  }


def _apply(ex, theta, scale, fx, fy):
  out = augment.apply_transform(ex, theta, scale, fx, fy, E, R)
  for key, value in out.items():  # dtypes are kept (float32 geometry, uint8 map)
    assert value.dtype == ex[key].dtype, key
  return out


def _corners(boxes):
  """[M, 8, 3] corners of (x, y, z, l, w, h, yaw) boxes."""
  signs = np.array([[i, j, k] for i in (-.5, .5) for j in (-.5, .5) for k in (-.5, .5)])
  local = signs[None] * boxes[:, None, 3:6]
  c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
  rot = np.stack([np.stack([c, -s, 0 * c], -1), np.stack([s, c, 0 * c], -1),
                  np.stack([0 * c, 0 * c, 1 + 0 * c], -1)], -2)
  return np.einsum('mij,mkj->mki', rot, local) + boxes[:, None, :3]


@pytest.mark.parametrize('theta,scale,fx,fy', [(0.3, 1.05, 1.0, 1.0), (-0.7, 0.95, -1.0, 1.0),
                                               (1.2, 1.0, -1.0, -1.0), (0.0, 1.0, 1.0, -1.0)])
def test_geometry_stays_consistent(theta, scale, fx, fy):
  ex = _example()
  out = _apply(ex, theta, scale, fx, fy)
  a = np.diag([fx, fy, 1.0])
  c, s = math.cos(theta), math.sin(theta)
  a = scale * np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ a
  np.testing.assert_allclose(out['points'][:, :3], ex['points'][:, :3] @ a.T, atol=1e-5)
  np.testing.assert_array_equal(out['points'][:, 3:], ex['points'][:, 3:])
  # Every camera sees every point at the same camera coordinates as before.
  for k in range(6):
    before = np.linalg.inv(ex['cam2lidar'][k].astype(np.float64))
    after = np.linalg.inv(out['cam2lidar'][k].astype(np.float64))
    np.testing.assert_allclose(out['points'][:, :3] @ after[:3, :3].T + after[:3, 3],
                               ex['points'][:, :3] @ before[:3, :3].T + before[:3, 3], atol=1e-4)
  # Box corners move with the transform (as sets: a flip reorders them), velocity too.
  want = np.sort(_corners(ex['boxes'].astype(np.float64)) @ a.T, axis=1)
  got = np.sort(_corners(out['boxes'].astype(np.float64)), axis=1)
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(out['boxes'][:, 7:9], (np.pad(ex['boxes'][:, 7:9], [(0, 0), (0, 1)])
                                                    @ a.T)[:, :2], atol=1e-5)
  assert np.all(np.abs(out['boxes'][:, 6]) <= math.pi + 1e-6)


def test_bev_map_rotates_and_flips_exactly():
  ex = _example()
  n = ex['bev_map'].shape[1]
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
  # +90 deg: (x, y) -> (-y, x); the cell (i, j) comes from (j, n - 1 - i).
  out = _apply(ex, math.pi / 2, 1.0, 1.0, 1.0)
  np.testing.assert_array_equal(out['bev_map'], ex['bev_map'][:, j, n - 1 - i])
  out = _apply(ex, 0.0, 1.0, -1.0, 1.0)
  np.testing.assert_array_equal(out['bev_map'], ex['bev_map'][:, n - 1 - i, j])
  # A rotation by 45 deg leaves the corners without a source: zero there.
  out = _apply(ex, math.pi / 4, 1.0, 1.0, 1.0)
  assert out['bev_map'][:, 0, 0].sum() == 0


def _converted_config(converted_data_dir, synthetic_dataroot, **kw):
  return tiny_config(data_dir=converted_data_dir, dataroot=synthetic_dataroot,
                     per_device_batch_size=2, **kw)


def test_pipeline_on_converted_world(converted_data_dir, synthetic_dataroot):
  from nsmae_jax.data.pipeline import make_eval_iterator, make_train_iterator
  config = _converted_config(converted_data_dir, synthetic_dataroot)
  batch = next(make_train_iterator(config, num_local_devices=2, process_index=0,
                                   process_count=1))
  assert batch['images'].shape == (2, 2, 6, 32, 88, 3)
  assert batch['points'].shape == (2, 2, 4096, 5) and batch['points_mask'].all()
  assert batch['bev_map'].shape == (2, 2, 6, 128, 128)
  assert batch['boxes_mask'].any() and batch['box_labels'].max() < 10
  evals = list(make_eval_iterator(config, num_local_devices=2, process_index=0, process_count=1))
  assert sum(int(b['valid'].sum()) for b in evals) == 4  # the val scene's 4 key frames


def test_augmented_pipeline_keeps_map_and_lidar_aligned(converted_data_dir, synthetic_dataroot):
  """After random rotation/flip/scale the walkway cells still carry the curb-height returns."""
  from nsmae_jax.data.pipeline import make_train_iterator
  config = _converted_config(converted_data_dir, synthetic_dataroot, max_points=70000)
  aug = augment.Augmentation(max_rotation=math.pi, min_scale=1.0, max_scale=1.0)
  it = make_train_iterator(config, num_local_devices=1, process_index=0, process_count=1,
                           augmentation=aug)
  road, walk = [], []
  e, r, n = config.data.bev_half_extent, config.data.bev_resolution, config.data.bev_cells
  for _ in range(4):
    batch = next(it)
    for pts, mask, bev in zip(batch['points'][0], batch['points_mask'][0], batch['bev_map'][0]):
      pts = pts[mask & (pts[:, 4] == 0)]
      i = np.floor((pts[:, 0] + e) / r).astype(int)
      j = np.floor((pts[:, 1] + e) / r).astype(int)
      ok = (i >= 0) & (i < n) & (j >= 0) & (j < n)
      pts, i, j = pts[ok], i[ok], j[ok]
      road.append(pts[(bev[0][i, j] == 1) & (bev[2][i, j] == 0), 2])
      walk.append(pts[(bev[2][i, j] == 1) & (bev[0][i, j] == 0), 2])

  def mode(z):
    counts, edges = np.histogram(np.concatenate(z), bins=np.arange(-4.0, 4.0, 0.02))
    return float(edges[counts.argmax()] + 0.01)
  assert 0.1 < mode(walk) - mode(road) < 0.2, (mode(road), mode(walk))
  again = make_train_iterator(config, num_local_devices=1, process_index=0, process_count=1,
                              augmentation=aug)
  plain = make_train_iterator(config, num_local_devices=1, process_index=0, process_count=1)
  first, first_plain = next(again), next(plain)
  np.testing.assert_array_equal(first['points'], next(make_train_iterator(
      config, num_local_devices=1, process_index=0, process_count=1,
      augmentation=aug))['points'])
  assert not np.allclose(first['cam2lidar'], first_plain['cam2lidar'])
