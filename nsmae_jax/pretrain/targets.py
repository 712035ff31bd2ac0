"""Rays and their reconstruction targets: the one place where pre-training draws them.

`draw_rays` draws the rays of a training step (inside the jitted step, per example, vmapped);
`full_view_rays` gives every pixel of one camera and every BEV cell of one example (pictures,
eval renders). All geometry in the key frame's LiDAR frame. Targets come from the UNMASKED
inputs: the images as stored and every LiDAR point (the encoders see the masked ones).

Perspective view: rays through the pixels where LiDAR points project (the ray passes exactly
through the point, depth target = the point's range from the camera centre; colour = bilinear
image colour there), plus random pixel centres (colour only).
BEV view: one ray per BEV cell of the fused volume's x-y grid, cast down from the volume's top;
depth target = z_top - z of the highest LiDAR return in the cell; colour target = that point's
colour in the first camera (nuScenes order) that sees it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.geometry import (bev_rays, bilinear_sample, camera_rays, grid_centers, in_image,
                                pixel_centers, pixel_index, project_points)

VIEWS = ('perspective', 'bev')


def _first_visible_camera(points: jnp.ndarray, intrinsics: jnp.ndarray, cam2lidar: jnp.ndarray,
                          image_hw: tuple[int, int]):
  """points [N, 3] -> camera [N] int (first that sees it), seen [N] bool, uv [N, 2] there."""
  uv, _, front = jax.vmap(lambda k, c: project_points(points, k, c))(intrinsics, cam2lidar)
  vis = front & in_image(uv, *image_hw)                                  # [K, N]
  cam = jnp.argmax(vis, axis=0)
  return cam, jnp.any(vis, axis=0), uv[cam, jnp.arange(points.shape[0])]


def _colors_at(images: jnp.ndarray, cam: jnp.ndarray, uv: jnp.ndarray) -> jnp.ndarray:
  """Bilinear image colour: images [K, H, W, 3], cam [N], uv [N, 2] -> [N, 3]."""
  hw = images.shape[1:3]
  return jax.vmap(lambda c, p: bilinear_sample(images[c], p[None], hw)[0])(cam, uv)


def _inside(points: jnp.ndarray, box_min, box_max) -> jnp.ndarray:
  lo, hi = jnp.asarray(box_min), jnp.asarray(box_max)
  return jnp.all((points >= lo) & (points <= hi), axis=-1)


def perspective_targets(key: jax.Array, images, intrinsics, cam2lidar, points, points_mask,
                        num_lidar: int, num_random: int, box_min, box_max) -> dict:
  """Perspective rays of one example.

  Args:
    key: PRNGKey; images [K, H, W, 3]; intrinsics [K, 3, 3]; cam2lidar [K, 4, 4];
    points [P, >=3], points_mask [P]; num_lidar + num_random = R rays; box: the volume bounds
    (points outside give no depth target: the renderer cannot reach them).

  Returns:
    origins, dirs [R, 3]; color [R, 3]; depth [R]; color_valid, depth_valid [R] bool.
  """
  k_sel, k_cam, k_pix = jax.random.split(key, 3)
  hw = images.shape[1:3]
  xyz = points[:, :3]
  cam, seen, uv = _first_visible_camera(xyz, intrinsics, cam2lidar, hw)
  usable = seen & points_mask.astype(bool) & _inside(xyz, box_min, box_max)
  # Usable points first (score >= 2), a uniform random subset of them.
  score = jax.random.uniform(k_sel, usable.shape) + 2.0 * usable
  _, idx = jax.lax.top_k(score, num_lidar)
  cam_l, uv_l, ok = cam[idx], uv[idx], usable[idx]
  o_l, d_l = camera_rays(uv_l, intrinsics[cam_l], cam2lidar[cam_l])
  depth_l = jnp.linalg.norm(xyz[idx] - o_l, axis=-1)
  color_l = _colors_at(images, cam_l, uv_l)

  cam_r = jax.random.randint(k_cam, (num_random,), 0, images.shape[0])
  pix = jax.random.randint(k_pix, (num_random, 2), 0, jnp.array([hw[1], hw[0]]))
  uv_r = pix.astype(jnp.float32)  # pixel centres are at integer (u, v)
  o_r, d_r = camera_rays(uv_r, intrinsics[cam_r], cam2lidar[cam_r])
  color_r = images[cam_r, pix[:, 1], pix[:, 0]]
  cat = lambda a, b: jnp.concatenate([a, b], axis=0)
  return dict(origins=cat(o_l, o_r), dirs=cat(d_l, d_r), color=cat(color_l, color_r),
              depth=cat(jnp.where(ok, depth_l, 0.0), jnp.zeros((num_random,))),
              color_valid=cat(ok, jnp.ones((num_random,), bool)),
              depth_valid=cat(ok, jnp.zeros((num_random,), bool)))


def bev_cell_targets(images, intrinsics, cam2lidar, points, points_mask,
                     grid: tuple[int, int], box_min, box_max) -> dict:
  """BEV rays and targets of every cell of one example (cell (i, j): flat index i * Y + j).

  Returns:
    origins, dirs [X*Y, 3]; color [X*Y, 3]; depth [X*Y]; color_valid, depth_valid [X*Y].
  """
  nx, ny = grid
  n = nx * ny
  xyz = points[:, :3]
  cell = jnp.array([(box_max[0] - box_min[0]) / nx, (box_max[1] - box_min[1]) / ny])
  ij = jnp.floor((xyz[:, :2] - jnp.array(box_min[:2])) / cell).astype(jnp.int32)
  ok = points_mask.astype(bool) & _inside(xyz, box_min, box_max)
  ij = jnp.clip(ij, 0, jnp.array([nx - 1, ny - 1]))
  ids = jnp.where(ok, ij[:, 0] * ny + ij[:, 1], n)
  z = jnp.where(ok, xyz[:, 2], -jnp.inf)
  zmax = jax.ops.segment_max(z, ids, n + 1)
  # The highest return of each cell (ties: the largest index).
  top = jax.ops.segment_max(jnp.where(ok & (z >= zmax[ids]), jnp.arange(z.shape[0]), -1),
                            ids, n + 1)[:n]
  occupied = top >= 0
  top_xyz = xyz[jnp.maximum(top, 0)]
  cam, seen, uv = _first_visible_camera(top_xyz, intrinsics, cam2lidar, images.shape[1:3])
  color = _colors_at(images, cam, uv)
  centres = grid_centers(grid, box_min[:2], box_max[:2]).reshape(-1, 2)
  origins, dirs = bev_rays(centres, box_max[2])
  return dict(origins=origins, dirs=dirs, color=jnp.where(occupied[:, None], color, 0.0),
              depth=jnp.where(occupied, box_max[2] - top_xyz[:, 2], 0.0),
              color_valid=occupied & seen, depth_valid=occupied)


def bev_targets(key: jax.Array, images, intrinsics, cam2lidar, points, points_mask,
                num_rays: int, grid: tuple[int, int], box_min, box_max) -> dict:
  """`num_rays` BEV cells of one example, occupied cells first (uniformly among them)."""
  cells = bev_cell_targets(images, intrinsics, cam2lidar, points, points_mask, grid, box_min,
                           box_max)
  score = jax.random.uniform(key, cells['depth_valid'].shape) + 2.0 * cells['depth_valid']
  _, idx = jax.lax.top_k(score, num_rays)
  return {k: v[idx] for k, v in cells.items()}


def lidar_depth_image(points, points_mask, intrinsics, cam2lidar, image_hw) -> jnp.ndarray:
  """Nearest LiDAR range per pixel of one camera: points [P, >=3] -> [H, W], 0 = no return."""
  h, w = image_hw
  uv, _, front = project_points(points[:, :3], intrinsics, cam2lidar)
  ok = front & in_image(uv, h, w) & points_mask.astype(bool)
  rc = pixel_index(uv, h, w)
  ids = jnp.where(ok, rc[:, 0] * w + rc[:, 1], h * w)
  rng = jnp.where(ok, jnp.linalg.norm(points[:, :3] - cam2lidar[:3, 3], axis=-1), jnp.inf)
  depth = jax.ops.segment_min(rng, ids, h * w + 1)[:h * w]
  return jnp.where(jnp.isfinite(depth), depth, 0.0).reshape(h, w)


def _example_args(batch: dict) -> tuple[jnp.ndarray, ...]:
  return (batch['images'].astype(jnp.float32), batch['intrinsics'].astype(jnp.float32),
          batch['cam2lidar'].astype(jnp.float32), batch['points'].astype(jnp.float32),
          batch['points_mask'])


def draw_rays(config: Config, key: jax.Array, batch: dict) -> dict[str, dict]:
  """The rays of one training step and their targets, for a batch [B, ...].

  Returns {view: dict(origins, dirs [B, R, 3], near [B, R], color [B, R, 3], depth [B, R],
  color_valid, depth_valid [B, R] bool)} for the views the config draws rays of
  (render.perspective_rays, render.bev_rays; 0 = none).
  """
  c = config
  box_min, box_max = c.volume_bounds
  b = batch['points'].shape[0]
  args = _example_args(batch)
  k_p, k_b = jax.random.split(key)
  views = {}
  n_p = c.render.perspective_rays
  if n_p:
    n_lidar = n_p // 2
    tg = jax.vmap(lambda k, *a: perspective_targets(k, *a, n_lidar, n_p - n_lidar, box_min,
                                                    box_max))(jax.random.split(k_p, b), *args)
    views['perspective'] = dict(tg, near=jnp.full(tg['depth'].shape, c.render.near))
  if c.render.bev_rays:
    grid = c.volume_shape[:2]
    num = min(c.render.bev_rays, grid[0] * grid[1])
    tg = jax.vmap(lambda k, *a: bev_targets(k, *a, num, grid, box_min, box_max))(
        jax.random.split(k_b, b), *args)
    views['bev'] = dict(tg, near=jnp.zeros(tg['depth'].shape))
  return views


def full_view_rays(config: Config, example: dict, camera: int) -> tuple[dict, dict]:
  """Every pixel of `camera` then every BEV cell of one example (arrays without the batch axis).

  Returns (rays, targets): rays = dict(origins, dirs [H*W + X*Y, 3], near [H*W + X*Y]);
  targets = perspective_color_target [H, W, 3], perspective_depth_target [H, W] (nearest LiDAR
  range in the pixel, 0 = none), bev_color_target [X, Y, 3] (0 = none), bev_depth_target
  [X, Y] (from the volume top, 0 = empty), with [X, Y] the fused volume's x-y grid.
  """
  c = config
  h, w = c.data.image_height, c.data.image_width
  grid = c.volume_shape[:2]
  box_min, box_max = c.volume_bounds
  images, intr, c2l, pts, pmask = _example_args(example)
  o, d = camera_rays(pixel_centers(h, w).reshape(-1, 2), intr[camera], c2l[camera])
  cells = bev_cell_targets(images, intr, c2l, pts, pmask, grid, box_min, box_max)
  near = jnp.concatenate([jnp.full((h * w,), c.render.near), jnp.zeros((grid[0] * grid[1],))])
  tg = dict(perspective_color_target=images[camera],
            perspective_depth_target=lidar_depth_image(pts, pmask, intr[camera], c2l[camera],
                                                       (h, w)),
            bev_color_target=jnp.where(cells['color_valid'][:, None], cells['color'],
                                       0.0).reshape(grid + (3,)),
            bev_depth_target=cells['depth'].reshape(grid))
  rays = dict(origins=jnp.concatenate([o, cells['origins']]),
              dirs=jnp.concatenate([d, cells['dirs']]), near=near)
  return rays, tg
