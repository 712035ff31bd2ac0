"""Rays and their reconstruction targets: the one place where pre-training draws them.

`draw_rays` draws the rays of a training step (inside the jitted step, per example, vmapped);
`full_view_rays` gives every pixel of one camera and every BEV cell of one example (pictures,
eval renders). All geometry in the key frame's LiDAR frame. Targets come from the UNMASKED
inputs: the images as stored and the LiDAR target points (the encoders see the masked inputs).

Target points: valid points with time lag <= loss.target_time_lag (default: the key frame only;
sweep points of moving objects are displaced by up to ~0.45 s of motion).
Occlusion: per camera, a z-buffer keeps the nearest target return of every pixel; only that
return gives targets there (a farther point in the same pixel is hidden behind it: the camera
sees the occluder's colour, and its range is not where the ray stops).

Perspective view: rays through the nearest returns of pixels that have one inside the volume
(the ray passes exactly through the point; depth target = its range from the camera centre;
colour = bilinear image colour there), plus random pixel centres (colour only).
BEV view: one ray per BEV cell of the fused volume's x-y grid, cast down from the volume's top;
depth target = z_top - z of the highest target return in the cell; colour target = that point's
colour in the first camera (nuScenes order) in which it is the nearest return at its pixel
(within a tolerance), else none.

Each ray also says where its targets came from, so that the loss can tell targets the encoder
saw from hidden ones (MAE): image_source [R, 3] (camera, row, col) of the colour and
lidar_cell [R, 2] (i, j) of the depth's point in the volume's x-y grid; and `background` [R]:
a perspective ray that has no in-volume return at its pixel and leaves the volume through its
top or sides (sky, facades above or beyond the volume).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsmae_jax.config import Config
from nsmae_jax.geometry import (bev_rays, bilinear_sample, camera_rays, grid_centers, in_image,
                                pixel_centers, pixel_index, project_points)
from nsmae_jax.render import box_near_far

VIEWS = ('perspective', 'bev')

# Occlusion tolerance: a point is the visible return at its pixel when its range is within
# max(_OCCLUSION_M, _OCCLUSION_REL * range) of the pixel's nearest. Relative because a
# low-resolution pixel spans metres of range on grazing ground, where returns of one surface
# differ by that much.
_OCCLUSION_M, _OCCLUSION_REL = 0.5, 0.05


def _inside(points: jnp.ndarray, box_min, box_max) -> jnp.ndarray:
  lo, hi = jnp.asarray(box_min), jnp.asarray(box_max)
  return jnp.all((points >= lo) & (points <= hi), axis=-1)


def target_points(points: jnp.ndarray, points_mask: jnp.ndarray,
                  max_time_lag: float) -> jnp.ndarray:
  """points [P, 5] (x, y, z, intensity, time lag s), mask [P] -> [P] bool: gives targets."""
  return points_mask.astype(bool) & (points[:, 4] <= max_time_lag)


def zbuffer(xyz: jnp.ndarray, valid: jnp.ndarray, intrinsics: jnp.ndarray,
            cam2lidar: jnp.ndarray, image_hw: tuple[int, int]) -> dict:
  """Nearest return per pixel of every camera.

  Args:
    xyz: [P, 3] LiDAR frame; valid [P] bool; intrinsics [K, 3, 3]; cam2lidar [K, 4, 4].

  Returns:
    uv [K, P, 2] projections; pixel [K, P] flat pixel id r * W + c (H * W = not seen);
    range [K, P] distance from the camera centre (m); nearest [K, H * W] nearest range per
    pixel (inf = no return); winner [K, H * W] index of that point (< 0 = none).
  """
  h, w = image_hw
  p = xyz.shape[0]

  def one(k, c2l):
    uv, _, front = project_points(xyz, k, c2l)
    ok = front & in_image(uv, h, w) & valid
    rc = pixel_index(uv, h, w)
    pix = jnp.where(ok, rc[:, 0] * w + rc[:, 1], h * w)
    rng = jnp.linalg.norm(xyz - c2l[:3, 3], axis=-1)
    nearest = jax.ops.segment_min(jnp.where(ok, rng, jnp.inf), pix, h * w + 1)
    # Ties: the largest index; empty pixels: the lowest int (< 0).
    winner = jax.ops.segment_max(jnp.where(ok & (rng <= nearest[pix]), jnp.arange(p), -1),
                                 pix, h * w + 1)
    return uv, pix, rng, nearest[:h * w], winner[:h * w]

  uv, pix, rng, nearest, winner = jax.vmap(one)(intrinsics, cam2lidar)
  return dict(uv=uv, pixel=pix, range=rng, nearest=nearest, winner=winner)


def _colors_at(images: jnp.ndarray, cam: jnp.ndarray, uv: jnp.ndarray) -> jnp.ndarray:
  """Bilinear image colour: images [K, H, W, 3], cam [N], uv [N, 2] -> [N, 3]."""
  hw = images.shape[1:3]
  return jax.vmap(lambda c, p: bilinear_sample(images[c], p[None], hw)[0])(cam, uv)


def _volume_cell(xy: jnp.ndarray, grid: tuple[int, int], box_min, box_max) -> jnp.ndarray:
  """[N, 2] LiDAR-frame x, y -> [N, 2] int (i, j) of the volume's x-y grid (clipped)."""
  cell = jnp.array([(box_max[0] - box_min[0]) / grid[0], (box_max[1] - box_min[1]) / grid[1]])
  ij = jnp.floor((xy - jnp.array(box_min[:2])) / cell).astype(jnp.int32)
  return jnp.clip(ij, 0, jnp.array([grid[0] - 1, grid[1] - 1]))


def _leaves_through_floor(origins, dirs, box_min, box_max) -> jnp.ndarray:
  """[R, 3] rays (starting inside the box) -> [R] bool: they leave the box through z_min."""
  _, far, _ = box_near_far(origins, dirs, box_min, box_max)
  z_exit = origins[:, 2] + far * dirs[:, 2]
  return z_exit <= box_min[2] + 1e-3


def perspective_targets(key: jax.Array, images, intrinsics, cam2lidar, xyz, valid, zb: dict,
                        num_lidar: int, num_random: int, grid: tuple[int, int], box_min,
                        box_max) -> dict:
  """Perspective rays of one example.

  Args:
    key: PRNGKey; images [K, H, W, 3]; intrinsics [K, 3, 3]; cam2lidar [K, 4, 4];
    xyz [P, 3] target points with valid [P]; zb: their zbuffer(); num_lidar + num_random = R;
    grid: the volume's x-y cells; box: the volume bounds (returns outside give no depth target:
    the renderer cannot reach them).

  Returns:
    origins, dirs [R, 3]; color [R, 3]; depth [R]; color_valid, depth_valid, background [R]
    bool; image_source [R, 3] and lidar_cell [R, 2] int (see the module docstring).
  """
  k_sel, k_cam, k_pix = jax.random.split(key, 3)
  k, (h, w) = images.shape[0], images.shape[1:3]
  inside = _inside(xyz, box_min, box_max) & valid
  winner = zb['winner']                                               # [K, H*W]
  has = (winner >= 0) & inside[jnp.maximum(winner, 0)]                # in-volume nearest return
  # Pixels with a return first (score >= 2), a uniform random subset of them.
  score = jax.random.uniform(k_sel, (k * h * w,)) + 2.0 * has.reshape(-1)
  _, slot = jax.lax.top_k(score, num_lidar)
  cam_l, pix_l = slot // (h * w), slot % (h * w)
  ok = has[cam_l, pix_l]
  pt = jnp.maximum(winner[cam_l, pix_l], 0)
  uv_l = zb['uv'][cam_l, pt]
  o_l, d_l = camera_rays(uv_l, intrinsics[cam_l], cam2lidar[cam_l])
  depth_l = zb['range'][cam_l, pt]
  color_l = _colors_at(images, cam_l, uv_l)
  rc_l = pixel_index(uv_l, h, w)

  cam_r = jax.random.randint(k_cam, (num_random,), 0, k)
  rc_r = jax.random.randint(k_pix, (num_random, 2), 0, jnp.array([h, w]))
  uv_r = rc_r[:, ::-1].astype(jnp.float32)  # pixel centres are at integer (u, v) = (c, r)
  o_r, d_r = camera_rays(uv_r, intrinsics[cam_r], cam2lidar[cam_r])
  color_r = images[cam_r, rc_r[:, 0], rc_r[:, 1]]
  background_r = (~has[cam_r, rc_r[:, 0] * w + rc_r[:, 1]]
                  & ~_leaves_through_floor(o_r, d_r, box_min, box_max))

  cat = lambda a, b: jnp.concatenate([a, b], axis=0)
  source = lambda c, rc: jnp.concatenate([c[:, None], rc], axis=-1)
  return dict(origins=cat(o_l, o_r), dirs=cat(d_l, d_r), color=cat(color_l, color_r),
              depth=cat(jnp.where(ok, depth_l, 0.0), jnp.zeros((num_random,))),
              color_valid=cat(ok, jnp.ones((num_random,), bool)),
              depth_valid=cat(ok, jnp.zeros((num_random,), bool)),
              background=cat(jnp.zeros((num_lidar,), bool), background_r),
              image_source=cat(source(cam_l, rc_l), source(cam_r, rc_r)),
              lidar_cell=cat(_volume_cell(xyz[pt, :2], grid, box_min, box_max),
                             jnp.zeros((num_random, 2), jnp.int32)))


def bev_cell_targets(images, intrinsics, cam2lidar, xyz, valid, zb: dict,
                     grid: tuple[int, int], box_min, box_max) -> dict:
  """BEV rays and targets of every cell of one example (cell (i, j): flat index i * Y + j).

  Args: as perspective_targets.

  Returns:
    origins, dirs [X*Y, 3]; color [X*Y, 3]; depth [X*Y]; color_valid, depth_valid,
    background (all False) [X*Y]; image_source [X*Y, 3], lidar_cell [X*Y, 2] int.
  """
  nx, ny = grid
  n = nx * ny
  h, w = images.shape[1:3]
  ok = valid & _inside(xyz, box_min, box_max)
  ij = _volume_cell(xyz[:, :2], grid, box_min, box_max)
  ids = jnp.where(ok, ij[:, 0] * ny + ij[:, 1], n)
  z = jnp.where(ok, xyz[:, 2], -jnp.inf)
  zmax = jax.ops.segment_max(z, ids, n + 1)
  # The highest return of each cell (ties: the largest index).
  top = jax.ops.segment_max(jnp.where(ok & (z >= zmax[ids]), jnp.arange(z.shape[0]), -1),
                            ids, n + 1)[:n]
  occupied = top >= 0
  top = jnp.maximum(top, 0)
  top_xyz = xyz[top]
  # The top point's colour is the camera's only where nothing nearer covers its pixel.
  pix, rng = zb['pixel'][:, top], zb['range'][:, top]                          # [K, n]
  nearest = jnp.take_along_axis(zb['nearest'], jnp.minimum(pix, h * w - 1), axis=1)
  unoccluded = rng <= nearest + jnp.maximum(_OCCLUSION_M, _OCCLUSION_REL * nearest)
  vis = (pix < h * w) & unoccluded                                             # [K, n]
  cam = jnp.argmax(vis, axis=0)
  seen = jnp.any(vis, axis=0)
  uv = zb['uv'][cam, top]
  color = _colors_at(images, cam, uv)
  centres = grid_centers(grid, box_min[:2], box_max[:2]).reshape(-1, 2)
  origins, dirs = bev_rays(centres, box_max[2])
  cells = jnp.stack(jnp.meshgrid(jnp.arange(nx), jnp.arange(ny), indexing='ij'), -1)
  return dict(origins=origins, dirs=dirs, color=jnp.where(occupied[:, None], color, 0.0),
              depth=jnp.where(occupied, box_max[2] - top_xyz[:, 2], 0.0),
              color_valid=occupied & seen, depth_valid=occupied,
              background=jnp.zeros((n,), bool),
              image_source=jnp.concatenate([cam[:, None], pixel_index(uv, h, w)], axis=-1),
              lidar_cell=cells.reshape(n, 2).astype(jnp.int32))


def bev_targets(key: jax.Array, images, intrinsics, cam2lidar, xyz, valid, zb: dict,
                num_rays: int, grid: tuple[int, int], box_min, box_max) -> dict:
  """`num_rays` BEV cells of one example, occupied cells first (uniformly among them)."""
  cells = bev_cell_targets(images, intrinsics, cam2lidar, xyz, valid, zb, grid, box_min,
                           box_max)
  score = jax.random.uniform(key, cells['depth_valid'].shape) + 2.0 * cells['depth_valid']
  _, idx = jax.lax.top_k(score, num_rays)
  return {k: v[idx] for k, v in cells.items()}


def _example_args(config: Config, example: dict) -> tuple[jnp.ndarray, ...]:
  """One example -> images, intrinsics, cam2lidar, target xyz [P, 3], valid [P], zbuffer."""
  images = example['images'].astype(jnp.float32)
  intr = example['intrinsics'].astype(jnp.float32)
  c2l = example['cam2lidar'].astype(jnp.float32)
  points = example['points'].astype(jnp.float32)
  valid = target_points(points, example['points_mask'], config.loss.target_time_lag)
  xyz = points[:, :3]
  zb = zbuffer(xyz, valid, intr, c2l, images.shape[1:3])
  return images, intr, c2l, xyz, valid, zb


def draw_rays(config: Config, key: jax.Array, batch: dict) -> dict[str, dict]:
  """The rays of one training step and their targets, for a batch [B, ...].

  Returns {view: dict(origins, dirs [B, R, 3], near [B, R], color [B, R, 3], depth [B, R],
  color_valid, depth_valid, background [B, R] bool, image_source [B, R, 3] int,
  lidar_cell [B, R, 2] int)} for the views the config draws rays of (render.perspective_rays,
  render.bev_rays; 0 = none).
  """
  c = config
  box_min, box_max = c.volume_bounds
  grid = c.volume_shape[:2]
  b = batch['points'].shape[0]
  k_p, k_b = jax.random.split(key)
  n_p, n_b = c.render.perspective_rays, min(c.render.bev_rays, grid[0] * grid[1])
  n_lidar = n_p // 2

  def one(kp, kb, example):
    args = _example_args(c, example)
    views = {}
    if n_p:
      views['perspective'] = perspective_targets(kp, *args, n_lidar, n_p - n_lidar, grid,
                                                 box_min, box_max)
    if n_b:
      views['bev'] = bev_targets(kb, *args, n_b, grid, box_min, box_max)
    return views

  keys = ('images', 'intrinsics', 'cam2lidar', 'points', 'points_mask')
  views = jax.vmap(one)(jax.random.split(k_p, b), jax.random.split(k_b, b),
                        {k: batch[k] for k in keys})
  near = {'perspective': c.render.near, 'bev': 0.0}
  return {v: dict(tg, near=jnp.full(tg['depth'].shape, near[v])) for v, tg in views.items()}


def full_view_rays(config: Config, example: dict, camera: int) -> tuple[dict, dict]:
  """Every pixel of `camera` then every BEV cell of one example (arrays without the batch axis).

  Returns (rays, targets): rays = dict(origins, dirs [H*W + X*Y, 3], near [H*W + X*Y]);
  targets = perspective_color_target [H, W, 3], perspective_depth_target [H, W] (nearest
  target return's range in the pixel, 0 = none), bev_color_target [X, Y, 3] (0 = none),
  bev_depth_target [X, Y] (from the volume top, 0 = empty), with [X, Y] the fused volume's x-y
  grid.
  """
  c = config
  h, w = c.data.image_height, c.data.image_width
  grid = c.volume_shape[:2]
  box_min, box_max = c.volume_bounds
  images, intr, c2l, xyz, valid, zb = _example_args(c, example)
  o, d = camera_rays(pixel_centers(h, w).reshape(-1, 2), intr[camera], c2l[camera])
  cells = bev_cell_targets(images, intr, c2l, xyz, valid, zb, grid, box_min, box_max)
  near = jnp.concatenate([jnp.full((h * w,), c.render.near), jnp.zeros((grid[0] * grid[1],))])
  nearest = zb['nearest'][camera]
  tg = dict(perspective_color_target=images[camera],
            perspective_depth_target=jnp.where(jnp.isfinite(nearest), nearest,
                                               0.0).reshape(h, w),
            bev_color_target=jnp.where(cells['color_valid'][:, None], cells['color'],
                                       0.0).reshape(grid + (3,)),
            bev_depth_target=cells['depth'].reshape(grid))
  rays = dict(origins=jnp.concatenate([o, cells['origins']]),
              dirs=jnp.concatenate([d, cells['dirs']]), near=near)
  return rays, tg
