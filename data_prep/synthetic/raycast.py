"""Vectorised ray casting against the analytic world: a two-level ground (road at z = 0, raised
blocks at the curb height, with curb faces) and yaw-oriented boxes.

Rays come as a grid [R, C] so that each box is only tested against the sub-grid its silhouette
can cover (a "span"), which keeps the cost proportional to the covered area.
Everything here is in the global frame; t is the ray parameter (metres for unit directions,
z-depth for camera directions with unit optical-axis component).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.synthetic import rig
from data_prep.synthetic.boxes import Boxes
from data_prep.synthetic.town import Town

GROUND = -1  # hit ids below 0: ground top, curb face, nothing
CURB = -2
SKY = -3
_CURB_SAMPLES = 12


@dataclasses.dataclass
class Hits:
  """Per ray of an [R, C] grid: t [R, C] (inf where nothing), hit [R, C] int32 (box index into
  the cast Boxes, or GROUND / CURB / SKY), face [R, C] int8 (box face 0-5: axis * 2 + positive
  side, in the box frame), material [R, C] uint8 (ground material where hit is GROUND/CURB),
  box_any [N] int64 rays that cross each box ignoring occlusion."""
  t: np.ndarray
  hit: np.ndarray
  face: np.ndarray
  material: np.ndarray
  box_any: np.ndarray


def ground_hits(town: Town, origin: np.ndarray, dirs: np.ndarray):
  """First hit of rays [M, 3] from `origin` [3] with the ground: (t [M], material [M], curb [M])."""
  dz = dirs[:, 2]
  down = dz < -1e-9
  t = np.full(len(dirs), np.inf)
  material = np.zeros(len(dirs), np.uint8)
  curb = np.zeros(len(dirs), bool)
  idx = np.nonzero(down)[0]
  d = dirs[idx]
  t_hi = (rig.CURB_HEIGHT - origin[2]) / d[:, 2]
  t_lo = -origin[2] / d[:, 2]
  p_hi = origin[:2] + t_hi[:, None] * d[:, :2]
  m_hi = town.material_at(p_hi[:, 0], p_hi[:, 1])
  raised_hi = rig.MATERIAL_RAISED[m_hi]
  t[idx[raised_hi]] = t_hi[raised_hi]
  material[idx[raised_hi]] = m_hi[raised_hi]
  low = ~raised_hi
  p_lo = origin[:2] + t_lo[low, None] * d[low, :2]
  m_lo = town.material_at(p_lo[:, 0], p_lo[:, 1])
  raised_lo = rig.MATERIAL_RAISED[m_lo]
  li = idx[low]
  t[li[~raised_lo]] = t_lo[low][~raised_lo]
  material[li[~raised_lo]] = m_lo[~raised_lo]
  # Rays that pass over a road cell at curb height but reach a raised cell before z = 0 hit
  # the curb face in between: find the first raised sample along that short stretch.
  ci = li[raised_lo]
  if len(ci):
    a, b = t_hi[low][raised_lo], t_lo[low][raised_lo]
    u = (np.arange(1, _CURB_SAMPLES + 1) / _CURB_SAMPLES)[None, :]
    ts = a[:, None] + (b - a)[:, None] * u
    px = origin[0] + ts * dirs[ci, 0:1]
    py = origin[1] + ts * dirs[ci, 1:2]
    raised = rig.MATERIAL_RAISED[town.material_at(px, py)]
    first = np.argmax(raised, axis=1)
    t[ci] = ts[np.arange(len(ci)), first]
    material[ci] = rig.MATERIAL_ID['curb']
    curb[ci] = True
  return t, material, curb


def cast_grid(town: Town, boxes: Boxes, origin: np.ndarray, dirs: np.ndarray, spans,
              max_t: float = np.inf) -> Hits:
  """Casts the ray grid dirs [R, C, 3] from origin [3] against the ground and `boxes`.

  spans: iterable of (box index, r0, r1, c0, c1): the sub-grids each box may cover.
  Returns Hits for the grid; hits beyond max_t are dropped (SKY).
  """
  r, c = dirs.shape[:2]
  tg, mat, curb = ground_hits(town, origin, dirs.reshape(-1, 3))
  t = tg.reshape(r, c)
  hit = np.where(np.isfinite(t), GROUND, SKY).astype(np.int32)
  hit[curb.reshape(r, c)] = CURB
  face = np.zeros((r, c), np.int8)
  box_any = np.zeros(len(boxes), np.int64)
  cos, sin = np.cos(boxes.yaw), np.sin(boxes.yaw)
  # Near boxes first, so a box whose nearest point lies behind everything already hit in its
  # span (e.g. a building behind a building) is skipped without a slab test.
  spans = list(spans)
  near = (np.hypot(boxes.centre[:, 0] - origin[0], boxes.centre[:, 1] - origin[1])
          - 0.5 * np.hypot(boxes.size[:, 0], boxes.size[:, 1]))
  spans.sort(key=lambda sp: (near[sp[0]], sp))
  for i, r0, r1, c0, c1 in spans:
    sub_t = t[r0:r1, c0:c1]
    if near[i] > 0 and sub_t.max() < near[i]:
      continue
    d = dirs[r0:r1, c0:c1]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    rel = origin - boxes.centre[i]
    ol = (rel[0] * cos[i] + rel[1] * sin[i], -rel[0] * sin[i] + rel[1] * cos[i], rel[2])
    half = (0.5 * boxes.size[i, 1], 0.5 * boxes.size[i, 0], 0.5 * boxes.size[i, 2])
    tmins, tnear, tfar = [], None, None
    # Slab test in the box frame (x along the length, y along the width).
    for a, da in enumerate((dx * cos[i] + dy * sin[i], -dx * sin[i] + dy * cos[i], dz)):
      da = np.where(np.abs(da) < 1e-12, 1e-12, da)
      t1 = (-half[a] - ol[a]) / da
      t2 = (half[a] - ol[a]) / da
      lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
      tmins.append((lo, da))
      tnear = lo if tnear is None else np.maximum(tnear, lo)
      tfar = hi if tfar is None else np.minimum(tfar, hi)
    ok = (tnear <= tfar) & (tnear > 1e-3) & (tnear < max_t)
    box_any[i] += int(np.count_nonzero(ok))
    better = ok & (tnear < sub_t)
    if not better.any():
      continue
    lows = np.stack([m[0][better] for m in tmins], -1)
    axis = lows.argmax(-1)
    da_hit = np.stack([m[1][better] for m in tmins], -1)[np.arange(len(axis)), axis]
    sub_t[better] = tnear[better]
    hit[r0:r1, c0:c1][better] = i
    face[r0:r1, c0:c1][better] = axis * 2 + (da_hit < 0)
  far = t > max_t
  t[far] = np.inf
  hit[far] = SKY
  return Hits(t, hit, face, mat.reshape(r, c), box_any)


def near_boxes(boxes: Boxes, origin: np.ndarray, max_range: float) -> np.ndarray:
  """Indices of boxes whose nearest point may lie within max_range of origin (xy)."""
  radius = 0.5 * np.hypot(boxes.size[:, 0], boxes.size[:, 1])
  dist = np.hypot(boxes.centre[:, 0] - origin[0], boxes.centre[:, 1] - origin[1])
  return np.nonzero(dist - radius < max_range)[0]


def lidar_spans(boxes: Boxes, index: np.ndarray, origin: np.ndarray, azimuth0: float,
                columns: int, rows: int):
  """Spans of a spinning-LiDAR grid whose column j points at global azimuth azimuth0 + 2 pi j / C."""
  step = 2 * np.pi / columns
  if not len(index):
    return []
  corners = boxes.select(index).corners()[..., :2] - origin[:2]
  radius = 0.5 * np.hypot(boxes.size[index, 0], boxes.size[index, 1])
  dist = np.hypot(boxes.centre[index, 0] - origin[0], boxes.centre[index, 1] - origin[1])
  centre_az = np.arctan2(boxes.centre[index, 1] - origin[1], boxes.centre[index, 0] - origin[0])
  az = np.arctan2(corners[..., 1], corners[..., 0]) - centre_az[:, None]
  az = (az + np.pi) % (2 * np.pi) - np.pi
  lo = centre_az + az.min(1) - azimuth0
  hi = centre_az + az.max(1) - azimuth0
  spans = []
  for k, i in enumerate(index):
    if dist[k] <= radius[k] + 0.5:
      spans.append((int(i), 0, rows, 0, columns))
      continue
    j0 = int(np.floor(lo[k] / step)) - 1
    j1 = int(np.ceil(hi[k] / step)) + 2
    j0, j1 = j0 % columns, j0 % columns + (j1 - j0)
    if j1 <= columns:
      spans.append((int(i), 0, rows, j0, j1))
    else:
      spans.append((int(i), 0, rows, j0, columns))
      spans.append((int(i), 0, rows, 0, min(j1 - columns, columns)))
  return spans


_EDGES = np.array([(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5),
                   (2, 6), (3, 7)])


def camera_spans(boxes: Boxes, index: np.ndarray, origin: np.ndarray, cam2global: np.ndarray,
                 intrinsic: np.ndarray, width: int, height: int, near: float = 0.05):
  """Pixel spans (rows v, columns u) covered by each box's silhouette, clipped at the near plane."""
  if not len(index):
    return []
  pts = (boxes.select(index).corners() - origin) @ cam2global  # [n, 8, 3] camera frame
  z = pts[..., 2]
  front = z > near
  a, b = pts[:, _EDGES[:, 0]], pts[:, _EDGES[:, 1]]
  za, zb = a[..., 2], b[..., 2]
  crossing = (za > near) != (zb > near)
  with np.errstate(divide='ignore', invalid='ignore'):
    f = np.where(crossing, (near - za) / np.where(crossing, zb - za, 1.0), 0.0)
  clip = a + f[..., None] * (b - a)
  cand = np.concatenate([pts, clip], 1)
  valid = np.concatenate([front, crossing], 1)
  zc = np.maximum(cand[..., 2], near)
  u = intrinsic[0, 0] * cand[..., 0] / zc + intrinsic[0, 2]
  v = intrinsic[1, 1] * cand[..., 1] / zc + intrinsic[1, 2]
  big = 1e9
  u0 = np.where(valid, u, big).min(1)
  u1 = np.where(valid, u, -big).max(1)
  v0 = np.where(valid, v, big).min(1)
  v1 = np.where(valid, v, -big).max(1)
  spans = []
  for k, i in enumerate(index):
    if not valid[k].any():
      continue
    c0, c1 = max(int(np.floor(u0[k])) - 1, 0), min(int(np.ceil(u1[k])) + 1, width)
    r0, r1 = max(int(np.floor(v0[k])) - 1, 0), min(int(np.ceil(v1[k])) + 1, height)
    if c0 < c1 and r0 < r1:
      spans.append((int(i), r0, r1, c0, c1))
  return spans
