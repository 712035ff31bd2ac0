"""Vectorised ray casting against the analytic world: a two-level ground (road at z = 0, raised
blocks at the curb height, with curb faces) and yaw-oriented boxes.

Rays come as a grid [R, C]; each box is only tested against the sub-grid its silhouette can cover
(a "span"). All (ray, box) pairs of all spans are tested in one flat vectorised pass and the
nearest hit per ray is kept with a scatter-min, so the cost is proportional to the covered area
with no per-box Python work. Everything here is in the global frame; t is the ray parameter
(metres for unit directions, z-depth for camera directions with unit optical-axis component).
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
_MIN_T = 1e-3  # hits closer than this (the ray starts inside or on a box face) are ignored


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
  """First hit of rays dirs [3, M] (planar x, y, z rows) from `origin` [3] with the ground:
  (t [M] float64, material [M] uint8, curb [M] bool)."""
  m = dirs.shape[1]
  t = np.full(m, np.inf)
  material = np.zeros(m, np.uint8)
  curb = np.zeros(m, bool)
  idx = np.flatnonzero(dirs[2] < -1e-9)
  dx, dy, dz = (dirs[k].take(idx).astype(np.float64) for k in range(3))
  t_hi = (rig.CURB_HEIGHT - origin[2]) / dz
  t_lo = -origin[2] / dz
  m_hi = town.material_at(origin[0] + t_hi * dx, origin[1] + t_hi * dy)
  raised_hi = rig.MATERIAL_RAISED[m_hi]
  t[idx[raised_hi]] = t_hi[raised_hi]
  material[idx[raised_hi]] = m_hi[raised_hi]
  low = np.flatnonzero(~raised_hi)
  t_lo = t_lo[low]
  m_lo = town.material_at(origin[0] + t_lo * dx[low], origin[1] + t_lo * dy[low])
  raised_lo = rig.MATERIAL_RAISED[m_lo]
  road = ~raised_lo
  t[idx[low[road]]] = t_lo[road]
  material[idx[low[road]]] = m_lo[road]
  # Rays that pass over a road cell at curb height but reach a raised cell before z = 0 hit
  # the curb face in between: find the first raised sample along that short stretch.
  ck = low[raised_lo]
  if len(ck):
    a, b = t_hi[ck], t_lo[raised_lo]
    u = (np.arange(1, _CURB_SAMPLES + 1) / _CURB_SAMPLES)[None, :]
    ts = a[:, None] + (b - a)[:, None] * u
    raised = rig.MATERIAL_RAISED[town.material_at(origin[0] + ts * dx[ck, None],
                                                  origin[1] + ts * dy[ck, None])]
    first = np.argmax(raised, axis=1)
    ci = idx[ck]
    t[ci] = ts[np.arange(len(ck)), first]
    material[ci] = rig.MATERIAL_ID['curb']
    curb[ci] = True
  return t, material, curb


def span_pairs(spans: np.ndarray, columns: int):
  """Every (ray, box) pair of the spans [S, 5] (box index, r0, r1, c0, c1) of a grid with
  `columns` columns: (flat ray index r * columns + c [P] int64, box index [P] int64)."""
  box, r0, r1, c0, c1 = spans.T
  h, w = r1 - r0, c1 - c0
  # One segment per (span, row), then its columns: no integer division per pair.
  seg_row = np.arange(h.sum()) - np.repeat(np.cumsum(h) - h, h) + np.repeat(r0, h)
  seg_w = np.repeat(w, h)
  seg_start = np.cumsum(seg_w) - seg_w
  first = seg_row * columns + np.repeat(c0, h) - seg_start
  ray = np.arange(seg_w.sum()) + np.repeat(first, seg_w)
  return ray, np.repeat(np.repeat(box, h), seg_w)


class _Slabs:
  """The slab test of rays against yaw-oriented boxes, in the precision of the rays.

  Per box (in the box frame, x along the length): yaw cos/sin and, per axis, the entry/exit
  plane offsets from the ray origin (-half - o, half - o). Per ray: x, y and 1 / z of its
  direction (z is the same in the box frame).
  """

  def __init__(self, boxes: Boxes, origin: np.ndarray, dirs: np.ndarray):
    dtype = dirs.dtype
    c, s = np.cos(boxes.yaw), np.sin(boxes.yaw)
    rel = origin - boxes.centre
    o = np.stack([rel[:, 0] * c + rel[:, 1] * s, -rel[:, 0] * s + rel[:, 1] * c, rel[:, 2]])
    half = 0.5 * boxes.size[:, [1, 0, 2]].T
    self.cos, self.sin = c.astype(dtype), s.astype(dtype)
    self.lo_plane = (-half - o).astype(dtype)  # [3, N]
    self.hi_plane = (half - o).astype(dtype)
    self.dx, self.dy = dirs[0], dirs[1]
    with np.errstate(divide='ignore'):
      self.inv_dz = (1 / dirs[2]).astype(dtype)

  def test(self, ray, box):
    """Entry parameter per axis (lows, 3 x [P]), tnear [P] and tfar [P] of the pairs."""
    dx, dy = self.dx[ray], self.dy[ray]
    c, s = self.cos[box], self.sin[box]
    with np.errstate(divide='ignore', invalid='ignore'):
      inv = (1 / (dx * c + dy * s), 1 / (dy * c - dx * s), self.inv_dz[ray])
      lows, tnear, tfar = [], None, None
      for a in range(3):
        t1 = self.lo_plane[a][box] * inv[a]
        t2 = self.hi_plane[a][box] * inv[a]
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        lows.append(lo)
        tnear = lo if tnear is None else np.maximum(tnear, lo)
        tfar = hi if tfar is None else np.minimum(tfar, hi)
    return lows, inv, tnear, tfar


_CHUNK = 1 << 14  # pairs per vectorised step: the temporaries stay in the CPU cache


def cast_grid(town: Town, boxes: Boxes, origin: np.ndarray, dirs: np.ndarray, spans,
              max_t: float = np.inf) -> Hits:
  """Casts the ray grid dirs [3, R, C] (planar x, y, z; float32 or float64, the precision of
  the box tests) from origin [3] against the ground and `boxes`.

  spans: [S, 5] rows (box index, r0, r1, c0, c1): the sub-grids each box may cover.
  Returns Hits for the grid; hits beyond max_t are dropped (SKY).
  """
  r, c = dirs.shape[1:]
  flat = dirs.reshape(3, -1)
  t, mat, curb = ground_hits(town, origin, flat)
  hit = np.where(np.isfinite(t), GROUND, SKY).astype(np.int32)
  hit[curb] = CURB
  face = np.zeros(r * c, np.int8)
  box_any = np.zeros(len(boxes), np.int64)
  spans = np.asarray(spans, np.int64).reshape(-1, 5)
  if len(spans):
    rays, boxs = span_pairs(spans, c)
    slabs = _Slabs(boxes, origin, flat)
    found = []
    for k in range(0, len(rays), _CHUNK):
      ray, box = rays[k:k + _CHUNK], boxs[k:k + _CHUNK]
      _, _, tnear, tfar = slabs.test(ray, box)
      ok = (tnear <= tfar) & (tnear > _MIN_T) & (tnear < max_t)
      box_any += np.bincount(box[ok], minlength=len(boxes))
      tnear = tnear.astype(np.float64)
      ok &= tnear <= t[ray]
      ray, box, tnear = ray[ok], box[ok], tnear[ok]
      np.minimum.at(t, ray, tnear)
      found.append((ray, box, tnear))
    ray, box, tnear = (np.concatenate(v) for v in zip(*found))
    # The nearest pair per ray; exact ties go to the lowest box index (order-free, so the
    # result does not depend on the span order).
    nearest = tnear == t[ray]
    ray, box = ray[nearest], box[nearest]
    best = np.full(r * c, len(boxes), np.int64)
    np.minimum.at(best, ray, box)
    win = box == best[ray]
    ray, box = ray[win], box[win]
    lows, inv, _, _ = slabs.test(ray, box)
    axis = np.where(lows[0] >= np.maximum(lows[1], lows[2]), 0, np.where(lows[1] >= lows[2], 1, 2))
    hit[ray] = box
    # The entry face is on the positive side when the ray runs towards -axis.
    face[ray] = axis * 2 + (np.choose(axis, inv) < 0)
  far = t > max_t
  t[far] = np.inf
  hit[far] = SKY
  return Hits(t.reshape(r, c), hit.reshape(r, c), face.reshape(r, c), mat.reshape(r, c), box_any)


def near_boxes(boxes: Boxes, origin: np.ndarray, max_range: float) -> np.ndarray:
  """Indices of boxes whose nearest point may lie within max_range of origin (xy)."""
  radius = 0.5 * np.hypot(boxes.size[:, 0], boxes.size[:, 1])
  dist = np.hypot(boxes.centre[:, 0] - origin[0], boxes.centre[:, 1] - origin[1])
  return np.nonzero(dist - radius < max_range)[0]


def lidar_spans(boxes: Boxes, index: np.ndarray, origin: np.ndarray, azimuth0: float,
                columns: int, elevations: np.ndarray) -> np.ndarray:
  """Spans [S, 5] (box, r0, r1, c0, c1) of a spinning-LiDAR grid whose column j points at global
  azimuth azimuth0 + 2 pi j / C and whose row r at elevation elevations[r] (radians, ascending).

  Rows are bounded by the elevations the box can subtend: its height range over its nearest and
  farthest horizontal distance (bounding circle), so a car far away covers a few rows only.
  """
  step = 2 * np.pi / columns
  rows = len(elevations)
  if not len(index):
    return np.zeros((0, 5), np.int64)
  corners = boxes.select(index).corners()[..., :2] - origin[:2]
  radius = 0.5 * np.hypot(boxes.size[index, 0], boxes.size[index, 1])
  dist = np.hypot(boxes.centre[index, 0] - origin[0], boxes.centre[index, 1] - origin[1])
  centre_az = np.arctan2(boxes.centre[index, 1] - origin[1], boxes.centre[index, 0] - origin[0])
  az = np.arctan2(corners[..., 1], corners[..., 0]) - centre_az[:, None]
  az = (az + np.pi) % (2 * np.pi) - np.pi
  lo = centre_az + az.min(1) - azimuth0
  hi = centre_az + az.max(1) - azimuth0
  j0 = np.floor(lo / step).astype(np.int64) - 1
  j1 = np.ceil(hi / step).astype(np.int64) + 2
  j0, j1 = j0 % columns, j0 % columns + (j1 - j0)
  # Boxes around the sensor cover every column; the others wrap at most once.
  inside = dist <= radius + 0.5
  j0 = np.where(inside, 0, j0)
  j1 = np.where(inside, columns, j1)
  near, far = np.maximum(dist - radius, 1e-3), dist + radius
  top = boxes.centre[index, 2] + 0.5 * boxes.size[index, 2] - origin[2]
  bottom = boxes.centre[index, 2] - 0.5 * boxes.size[index, 2] - origin[2]
  el_hi = np.where(inside & (top > 0), np.pi / 2, np.arctan2(top, np.where(top > 0, near, far)))
  el_lo = np.where(inside & (bottom < 0), -np.pi / 2,
                   np.arctan2(bottom, np.where(bottom < 0, near, far)))
  r0 = np.maximum(np.searchsorted(elevations, el_lo) - 1, 0)
  r1 = np.minimum(np.searchsorted(elevations, el_hi) + 1, rows)
  index = index.astype(np.int64)
  zeros = np.zeros_like(index)
  first = np.stack([index, r0, r1, j0, np.minimum(j1, columns)], 1)
  wrap = j1 > columns
  second = np.stack([index, r0, r1, zeros, np.minimum(j1 - columns, columns)], 1)[wrap]
  spans = np.concatenate([first, second])
  return spans[spans[:, 1] < spans[:, 2]]


_EDGES = np.array([(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5),
                   (2, 6), (3, 7)])


def camera_spans(boxes: Boxes, index: np.ndarray, origin: np.ndarray, cam2global: np.ndarray,
                 intrinsic: np.ndarray, width: int, height: int, near: float = 0.05) -> np.ndarray:
  """Pixel spans [S, 5] (box, rows v0..v1, columns u0..u1) covered by each box's silhouette,
  clipped at the near plane."""
  if not len(index):
    return np.zeros((0, 5), np.int64)
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
  seen = valid.any(1)
  c0 = np.maximum(np.floor(np.where(seen, u0, 0)) - 1, 0).astype(np.int64)
  c1 = np.minimum(np.ceil(np.where(seen, u1, 0)) + 1, width).astype(np.int64)
  r0 = np.maximum(np.floor(np.where(seen, v0, 0)) - 1, 0).astype(np.int64)
  r1 = np.minimum(np.ceil(np.where(seen, v1, 0)) + 1, height).astype(np.int64)
  keep = seen & (c0 < c1) & (r0 < r1)
  return np.stack([index.astype(np.int64), r0, r1, c0, c1], 1)[keep]
