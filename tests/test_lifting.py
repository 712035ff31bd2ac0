"""Geometric lifting against nuscenes-devkit's projection (view_points)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nuscenes.utils.geometry_utils import view_points

from helpers import tiny_config
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.geometry import grid_centers as voxel_centers
from nsmae_jax.models import lifting
from nsmae_jax.models.lifting import CameraLifting, lift_features


def _devkit_uv(point: np.ndarray, intrinsics: np.ndarray, cam2lidar: np.ndarray):
  """(u, v) and depth of a LiDAR-frame point as the devkit computes them (lidar -> cam, then
  view_points with normalize=True)."""
  lidar2cam = np.linalg.inv(cam2lidar.astype(np.float64))
  p_cam = lidar2cam[:3, :3] @ point + lidar2cam[:3, 3]
  uv = view_points(p_cam[:, None], intrinsics.astype(np.float64), normalize=True)[:2, 0]
  return uv, p_cam[2]


# lift_features jitted (volume shape, bounds and image size static).
_lift_jit = jax.jit(lift_features, static_argnums=(3, 4, 5, 6))


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
    volume, seen = _lift_jit(fm, intr, c2l, shape, box_min, box_max, (h, w))
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
  volume, seen = _lift_jit(fm, batch['intrinsics'][0], batch['cam2lidar'][0],
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


# A small rig for the dense-vs-gather checks: 3 cameras with 90-degree fields of view on 4x6
# feature maps of a 16x24 image, in a 6x5x3 volume over [-4, 4]^2 x [-1, 1].
_SHAPE, _BOX, _HW, _FEAT = (6, 5, 3), ((-4.0, -4.0, -1.0), (4.0, 4.0, 1.0)), (16, 24), (4, 6)


def _rig(seed=0):
  """Intrinsics [3, 3, 3] and cam2lidar [3, 4, 4]: cameras 0 and 1 (yaw ~0 and ~60 degrees, near
  the centre) overlap; camera 2 stands outside the box looking back at it (yaw ~150); nothing
  sees the -x, -y corner."""
  rng = np.random.default_rng(seed)
  intr = np.array([[12.0, 0, 11.5], [0, 12.0, 7.5], [0, 0, 1]], np.float32)
  c2ls = []
  for yaw, pos in ((0.0, (0.3, -0.2, 0.1)), (60.0, (-0.2, 0.4, 0.0)), (150.0, (6.0, 0.5, 0.2))):
    t = np.deg2rad(yaw + rng.uniform(-5, 5))
    fwd, right = np.array([np.cos(t), np.sin(t), 0]), np.array([np.sin(t), -np.cos(t), 0])
    c2l = np.eye(4)
    c2l[:3, :3] = np.stack([right, [0, 0, -1], fwd], axis=1)   # columns: x right, y down, z fwd
    c2l[:3, 3] = np.asarray(pos) + rng.uniform(-0.1, 0.1, 3)
    c2ls.append(c2l)
  return np.stack([intr] * 3), np.stack(c2ls).astype(np.float32)


def test_dense_and_gather_lifting_agree_in_value_and_gradients():
  intr, c2l = _rig()
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(3,) + _FEAT + (5,)).astype(np.float32)
  cot = rng.normal(size=_SHAPE + (5,)).astype(np.float32)

  def run(dense, f, c):
    def loss(f, c):
      vol, _ = lift_features(f, intr, c, _SHAPE, *_BOX, _HW, dense=dense)
      return jnp.sum(jnp.sin(vol) * cot)
    vol, seen = lift_features(f, intr, c, _SHAPE, *_BOX, _HW, dense=dense)
    return vol, seen, jax.grad(loss, argnums=(0, 1))(f, c)

  # One compilation: both paths, values and gradients.
  (vol_d, seen_d, (gf_d, gc_d)), (vol_g, seen_g, (gf_g, gc_g)) = jax.tree.map(
      np.asarray, jax.jit(lambda f, c: (run(True, f, c), run(False, f, c)))(feats, c2l))
  counts = set(np.unique(seen_g).tolist())
  assert 0 in counts and 1 in counts and 2 in counts, counts   # blind, single and shared voxels
  np.testing.assert_array_equal(seen_d, seen_g)
  assert np.all(vol_d[seen_g == 0] == 0)
  np.testing.assert_allclose(vol_d, vol_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gf_d, gf_g, rtol=1e-5, atol=1e-6)
  assert np.abs(gf_g).max() > 0.1
  # Same semantics w.r.t. the calibration too (no stop_gradient on the dense map).
  np.testing.assert_allclose(gc_d, gc_g, rtol=1e-4, atol=1e-5)


def _builds_w(intr, c2l, feats):
  """Whether lift_features (path left to the guard) scatters W, i.e. takes the dense path."""
  lift = lambda f: lift_features(f, intr, c2l, _SHAPE, *_BOX, _HW)   # fresh: no trace cache
  return 'scatter-add' in str(jax.make_jaxpr(lift)(feats))


def test_the_guard_picks_the_gather_path_above_the_limit(monkeypatch):
  intr, c2l = _rig()
  feats = np.ones((3,) + _FEAT + (2,), np.float32)
  nbytes = lifting.dense_lift_bytes(_SHAPE, feats.shape)
  assert nbytes == 4 * 90 * 3 * 24
  assert lifting.use_dense_lift(_SHAPE, feats.shape) and _builds_w(intr, c2l, feats)
  monkeypatch.setattr(lifting, 'DENSE_LIFT_MAX_BYTES', nbytes - 1)
  assert not lifting.use_dense_lift(_SHAPE, feats.shape) and not _builds_w(intr, c2l, feats)
  # The module sizes W over its per-device batch: 2 examples need twice the bytes.
  monkeypatch.setattr(lifting, 'DENSE_LIFT_MAX_BYTES', nbytes)
  assert lifting.use_dense_lift(_SHAPE, feats.shape, batch=1)
  assert not lifting.use_dense_lift(_SHAPE, feats.shape, batch=2)


@pytest.mark.slow  # compiles the lifting four ways (fast tier: < 2 min)
def test_camera_lifting_paths_agree_with_and_without_remat(monkeypatch):
  intr, c2l = _rig()
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(2, 3) + _FEAT + (4,)).astype(np.float32)
  intr_b, c2l_b = np.stack([intr] * 2), np.stack([c2l, _rig(3)[1]])
  results = {}
  for remat in (False, True):
    model = CameraLifting(_SHAPE, *_BOX, _HW, channels=3, remat=remat)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), feats, intr_b, c2l_b)
    loss = lambda p, f: jnp.sum(jnp.tanh(model.apply(p, f, intr_b, c2l_b)))
    for limit in (2**30, 0):   # dense, then gathers
      monkeypatch.setattr(lifting, 'DENSE_LIFT_MAX_BYTES', limit)
      results[remat, limit] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, feats)
  ref = results[False, 0]
  for key, (value, grads) in results.items():
    np.testing.assert_allclose(value, ref[0], rtol=1e-5, err_msg=str(key))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))
