"""nsmae_jax.geometry: projection, rays and sampling share one pixel-centre convention (OpenCV:
centres at integers), the one the converter's resized intrinsics and cv2.resize use."""

import jax
import jax.numpy as jnp
import numpy as np

from data_prep.nuscenes_nsmae.record import resized_intrinsics
from nsmae_jax import geometry

# The functions under test, jitted (sizes static): one compilation per call signature instead
# of an eager dispatch, and compilation, of every op.
project_points = jax.jit(geometry.project_points)
camera_rays = jax.jit(geometry.camera_rays)
bev_rays = jax.jit(geometry.bev_rays)
in_image = jax.jit(geometry.in_image, static_argnums=(1, 2))
pixel_index = jax.jit(geometry.pixel_index, static_argnums=(1, 2))
pixel_centers = jax.jit(geometry.pixel_centers, static_argnums=(0, 1))
grid_centers = jax.jit(geometry.grid_centers, static_argnums=(0, 1, 2))
bilinear_sample = jax.jit(geometry.bilinear_sample, static_argnums=2)

# A nuScenes CAM_FRONT-like camera (1600 x 900) stored at 176 x 64, as the demo converts it.
NATIVE_HW, STORED_HW = (900, 1600), (64, 176)
K_NATIVE = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])


def _cam2lidar():
  yaw = np.deg2rad(30)
  cam2lidar = np.eye(4, dtype=np.float64)
  base = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)  # x_cam=x, y_cam=-z, z_cam=y
  rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
  cam2lidar[:3, :3] = rz @ base
  cam2lidar[:3, 3] = [0.3, 0.5, -0.2]
  return cam2lidar


def test_camera_ray_passes_through_the_projected_point():
  cam2lidar = _cam2lidar().astype(np.float32)
  intr = np.array([[70.0, 0, 44], [0, 70.0, 16], [0, 0, 1]], np.float32)
  point = np.array([-4.0, 12.0, 0.7], np.float32)
  uv, depth, front = project_points(jnp.asarray(point), intr, cam2lidar)
  assert bool(front) and float(depth) > 0
  o, d = camera_rays(uv, intr, cam2lidar)
  rng_ = np.linalg.norm(point - np.asarray(o))
  np.testing.assert_allclose(np.asarray(o) + rng_ * np.asarray(d), point, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(d), 1.0, rtol=1e-6)


def test_generated_pixel_rays_agree_with_lidar_projection_after_a_resize():
  """A point on the ray emitted for stored pixel (r, c) projects, with the record's (resized)
  intrinsics, onto (c, r) itself, and with the native intrinsics onto the native position of
  that pixel's centre, (c + 1/2) * 1600 / 176 - 1/2: both within 0.01 px."""
  k_stored = resized_intrinsics(K_NATIVE, NATIVE_HW, STORED_HW)
  cam2lidar = _cam2lidar()
  centres = np.asarray(pixel_centers(*STORED_HW), np.float64)
  rng = np.random.default_rng(0)
  rows, cols = rng.integers(0, STORED_HW[0], 50), rng.integers(0, STORED_HW[1], 50)
  uv = centres[rows, cols]
  np.testing.assert_array_equal(uv, np.stack([cols, rows], -1))
  o, d = (np.asarray(a, np.float64) for a in camera_rays(jnp.asarray(uv), k_stored, cam2lidar))
  points = o + rng.uniform(2.0, 60.0, size=(50, 1)) * d
  # Float64 reference projection (the devkit's lidar -> camera -> view_points chain).
  lidar2cam = np.linalg.inv(cam2lidar)
  p_cam = points @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
  for k, expected in ((k_stored, uv), (K_NATIVE, (uv + 0.5) * [1600 / 176, 900 / 64] - 0.5)):
    pix = p_cam @ k.T
    np.testing.assert_allclose(pix[:, :2] / pix[:, 2:], expected, atol=0.01)
  # And the float32 projection of the library lands in the same pixel.
  got, _, front = project_points(jnp.asarray(points, jnp.float32),
                                 jnp.asarray(k_stored, jnp.float32),
                                 jnp.asarray(cam2lidar, jnp.float32))
  assert bool(np.all(front))
  np.testing.assert_allclose(np.asarray(got), uv, atol=0.01)
  np.testing.assert_array_equal(np.asarray(pixel_index(got, *STORED_HW)),
                                np.stack([rows, cols], -1))


def test_in_image_and_pixel_index_use_half_pixel_borders():
  uv = jnp.array([[-0.5, 0.0], [-0.51, 0.0], [175.49, 63.49], [175.5, 0.0], [0.0, 63.5]])
  np.testing.assert_array_equal(np.asarray(in_image(uv, 64, 176)),
                                [True, False, True, False, False])
  np.testing.assert_array_equal(np.asarray(pixel_index(jnp.array([[0.49, 0.51], [3.5, 2.49]]),
                                                       64, 176)), [[1, 0], [2, 4]])


def test_bilinear_sample_returns_pixels_at_their_centres_and_is_resize_consistent():
  image = np.random.default_rng(0).uniform(size=(6, 10, 3)).astype(np.float32)
  rr, cc = np.meshgrid(np.arange(6), np.arange(10), indexing='ij')
  uv = jnp.asarray(np.stack([cc, rr], -1).reshape(-1, 2), jnp.float32)
  np.testing.assert_allclose(np.asarray(bilinear_sample(image, uv, (6, 10))),
                             image.reshape(-1, 3), rtol=1e-6)
  # A 3x2 feature map of a 6x10 image: cell (0, 0) covers pixels [0, 5) x [0, 2), centred at
  # image (u, v) = (2, 0.5).
  fm = np.zeros((3, 2, 1), np.float32)
  fm[0, 0] = 1.0
  np.testing.assert_allclose(np.asarray(bilinear_sample(fm, jnp.array([[2.0, 0.5]]), (6, 10))),
                             [[1.0]], rtol=1e-6)


def test_bev_rays_start_at_cell_centres_and_point_down():
  centres = grid_centers((4, 2), (-2.0, -1.0), (2.0, 1.0))
  np.testing.assert_allclose(np.asarray(centres[0, 0]), [-1.5, -0.5])
  np.testing.assert_allclose(np.asarray(centres[3, 1]), [1.5, 0.5])
  o, d = bev_rays(jnp.array([[1.0, 2.0], [40.0, 0.0]]), 3.0)
  np.testing.assert_allclose(o, [[1, 2, 3], [40, 0, 3]])
  np.testing.assert_allclose(d, [[0, 0, -1], [0, 0, -1]])
