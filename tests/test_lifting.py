"""Geometric lifting against nuscenes-devkit's projection (view_points)."""

import jax
import numpy as np
from nuscenes.utils.geometry_utils import view_points

from helpers import tiny_config
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.geometry import grid_centers as voxel_centers
from nsmae_jax.models.lifting import lift_features


def _devkit_uv(point: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray):
  """(u, v) and depth of a LiDAR-frame point as the devkit computes them (lidar -> cam, then
  view_points with normalize=True)."""
  lidar2cam = np.linalg.inv(cam2lidar.astype(np.float64))
  p_cam = lidar2cam[:3, :3] @ point + lidar2cam[:3, 3]
  uv = view_points(p_cam[:, None], intrinsics.astype(np.float64), normalize=True)[:2, 0]
  return uv, p_cam[2]


def test_feature_at_the_devkit_pixel_is_what_the_voxel_receives():
  config = tiny_config()
  batch = fake_batch(config, 1)
  intr, c2l = batch['intrinsics'][0], batch['cam2lidar'][0]
  h, w = config.data.image_height, config.data.image_width
  box_min, box_max = config.volume_bounds
  shape = config.volume_shape
  centres = np.asarray(voxel_centers(shape, box_min, box_max))
  # The voxels each camera sees, by the devkit's projection (depth > 0.1, inside the image).
  def sees(cam, p):
    uv, depth = _devkit_uv(p, intr[cam], c2l[cam])
    return depth > 0.1 and -0.5 <= uv[0] < w - 0.5 and -0.5 <= uv[1] < h - 0.5
  flat = centres.reshape(-1, 3)
  rng = np.random.default_rng(0)
  checked = 0
  for idx in rng.permutation(len(flat)):
    cams = [k for k in range(6) if sees(k, flat[idx])]
    if len(cams) != 1:
      continue
    cam = cams[0]
    uv, _ = _devkit_uv(flat[idx], intr[cam], c2l[cam])
    r, c = int(np.floor(uv[1] + 0.5)), int(np.floor(uv[0] + 0.5))  # pixel centres at integers
    value = rng.normal(size=4).astype(np.float32)
    fm = np.zeros((6, h, w, 4), np.float32)
    # A constant 3x3 block around the pixel: bilinear sampling anywhere inside the pixel
    # returns exactly the block's value.
    fm[cam, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = value
    volume, seen = jax.jit(lift_features, static_argnums=(3, 4, 5, 6))(
        fm, intr, c2l, shape, box_min, box_max, (h, w))
    i, j, k = np.unravel_index(idx, shape)
    np.testing.assert_allclose(np.asarray(volume)[i, j, k], value, rtol=1e-5, atol=1e-6)
    assert int(seen[i, j, k]) == 1
    checked += 1
    if checked == 3:
      break
  assert checked == 3, 'no voxel seen by exactly one camera'


def test_voxels_average_over_the_cameras_that_see_them_and_unseen_are_zero():
  config = tiny_config()
  batch = fake_batch(config, 1)
  h, w = config.data.image_height, config.data.image_width
  box_min, box_max = config.volume_bounds
  # Camera k's feature map is the constant k + 1: a voxel's value is the mean of the ids of
  # the cameras that see it.
  fm = np.broadcast_to(np.arange(1, 7, dtype=np.float32)[:, None, None, None],
                       (6, h, w, 1)).copy()
  volume, seen = lift_features(fm, batch['intrinsics'][0], batch['cam2lidar'][0],
                               config.volume_shape, box_min, box_max, (h, w))
  volume, seen = np.asarray(volume)[..., 0], np.asarray(seen)
  centres = np.asarray(voxel_centers(config.volume_shape, box_min, box_max)).reshape(-1, 3)
  expected = np.zeros(len(centres))
  count = np.zeros(len(centres))
  for k in range(6):
    lidar2cam = np.linalg.inv(batch['cam2lidar'][0, k].astype(np.float64))
    p = centres @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
    uv = view_points(p.T, batch['intrinsics'][0, k].astype(np.float64), normalize=True)[:2].T
    # The image plane spans [-1/2, W - 1/2) x [-1/2, H - 1/2) (pixel centres at integers).
    vis = ((p[:, 2] > 0.1) & (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5)
           & (uv[:, 1] < h - 0.5))
    expected += vis * (k + 1)
    count += vis
  expected = np.where(count > 0, expected / np.maximum(count, 1), 0.0)
  assert count.max() >= 2 and (count == 0).any()  # overlaps and blind voxels both occur
  np.testing.assert_array_equal(seen.reshape(-1), count)
  np.testing.assert_allclose(volume.reshape(-1), expected, rtol=1e-6)
