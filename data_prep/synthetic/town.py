"""Procedural town: a grid of roads with painted markings, raised blocks, buildings and trees.

All layout coordinates are integer decimetres so that the ground raster (0.1 m cells, origin at
map (0, 0)) and the map-expansion polygons are drawn from exactly the same rectangles.
Frame: the global (map) frame, x east, y north, metres; z = 0 on the road surface.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data_prep.synthetic import rig
from data_prep.synthetic.boxes import Boxes, make_boxes

RES = 0.1  # metres per raster cell
LANE_DM = 35  # lane width, decimetres
ZEBRA_DM = 40  # zebra crossing depth along the road
STOP_DM = 4  # stop line width


@dataclasses.dataclass
class Town:
  """One location's town.

  xs, ys: road centreline positions (dm) of the north-south roads (constant x) and east-west
  roads (constant y). lanes_x, lanes_y: lanes per direction of each road. size_dm: (W, H).
  material: uint8 [H/0.1, W/0.1] ground material per cell (row = y, column = x).
  texture: uint8 [H/0.1, W/0.1] albedo variation per cell. scenery: static boxes.
  rects: map layer name -> list of rectangles (x0, y0, x1, y1) dm; lines: layer -> list of
  ((x0, y0), (x1, y1)) dm. blocks: per block dict(type, rect, interior, sidewalk_rects).
  """
  location: str
  xs: np.ndarray
  ys: np.ndarray
  lanes_x: np.ndarray
  lanes_y: np.ndarray
  sidewalk_dm: int
  size_dm: tuple
  material: np.ndarray
  texture: np.ndarray
  scenery: Boxes
  rects: dict
  lines: dict
  blocks: list
  carparks: list
  segments: list  # (axis 'x'|'y', road index, lo_dm, hi_dm): lane stretches between intersections

  def half_width_dm(self, axis: str, index: int) -> int:
    lanes = self.lanes_x if axis == 'x' else self.lanes_y
    return int(lanes[index]) * LANE_DM

  def material_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground material id at global (x, y) metres (grass outside the raster)."""
    return self._padded_material.take(self._padded_index(x, y))

  def texture_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Texture value (uint8) at global (x, y) metres (the border cell's outside the raster)."""
    h, w = self.texture.shape
    ix = np.clip(np.floor(x / RES), 0, w - 1).astype(np.int64)
    iy = np.clip(np.floor(y / RES), 0, h - 1).astype(np.int64)
    return self.texture.take(iy * w + ix)

  @functools.cached_property
  def _padded_material(self) -> np.ndarray:
    """The material raster with a one-cell grass border, flattened [(H + 2) * (W + 2)]: every
    point outside the raster clamps onto the border, so a lookup is one gather."""
    return np.pad(self.material, 1, constant_values=rig.MATERIAL_ID['grass']).ravel()

  def _padded_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = self.material.shape
    ix = np.clip(np.floor(x / RES), -1, w).astype(np.int64)
    iy = np.clip(np.floor(y / RES), -1, h).astype(np.int64)
    return (iy + 1) * (w + 2) + (ix + 1)


def _positions(rng, n, lo, hi, margin):
  gaps = rng.integers(lo, hi, size=n - 1)
  return margin + np.concatenate([[0], np.cumsum(gaps)])


def _texture(rng, shape) -> np.ndarray:
  """uint8 texture: 4 m blotches plus per-cell grain, each 0-127 (integer maths: no float pass
  over the full raster)."""
  coarse = (rng.random((shape[0] // 40 + 2, shape[1] // 40 + 2)) * 128).astype(np.uint8)
  coarse = np.repeat(np.repeat(coarse, 40, 0), 40, 1)[:shape[0], :shape[1]]
  grain = np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape) >> 1
  return grain + coarse


def build_town(seed: int, location_index: int) -> Town:
  """The town at rig.LOCATIONS[location_index] for `seed` (deterministic)."""
  rng = np.random.default_rng([seed, 7919, location_index])
  nx, ny = int(rng.integers(4, 6)), int(rng.integers(4, 6))
  margin = 400
  xs = _positions(rng, nx, 550, 850, margin)
  ys = _positions(rng, ny, 550, 850, margin)
  lanes_x = rng.integers(1, 3, size=nx)
  lanes_y = rng.integers(1, 3, size=ny)
  sw = int(rng.integers(25, 41))
  size = (int(xs[-1] + margin), int(ys[-1] + margin))
  mat = np.full((size[1], size[0]), rig.MATERIAL_ID['grass'], np.uint8)
  m = rig.MATERIAL_ID
  rects = {k: [] for k in ('drivable_area', 'road_segment', 'intersection', 'lane', 'ped_crossing',
                           'walkway', 'stop_line', 'carpark_area')}
  lines = {'road_divider': [], 'lane_divider': []}

  def fill(rect, material):
    x0, y0, x1, y1 = rect
    mat[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = material

  # Block cells lie between road edges (the town border closes the outer ones).
  hwx = lanes_x * LANE_DM
  hwy = lanes_y * LANE_DM
  xe = [0] + [v for i in range(nx) for v in (xs[i] - hwx[i], xs[i] + hwx[i])] + [size[0]]
  ye = [0] + [v for j in range(ny) for v in (ys[j] - hwy[j], ys[j] + hwy[j])] + [size[1]]
  blocks = []
  boxes = []
  carparks = []
  for bi in range(nx + 1):
    for bj in range(ny + 1):
      rect = (int(xe[2 * bi]), int(ye[2 * bj]), int(xe[2 * bi + 1]), int(ye[2 * bj + 1]))
      x0, y0, x1, y1 = rect
      walks = [(x0, y0, x1, y0 + sw), (x0, y1 - sw, x1, y1), (x0, y0 + sw, x0 + sw, y1 - sw),
               (x1 - sw, y0 + sw, x1, y1 - sw)]
      for w in walks:
        fill(w, m['sidewalk'])
        rects['walkway'].append(w)
      interior = (x0 + sw, y0 + sw, x1 - sw, y1 - sw)
      kind = rng.choice(['buildings', 'park', 'carpark'], p=[0.55, 0.25, 0.2])
      edge = bi in (0, nx) or bj in (0, ny)
      if edge and kind == 'carpark':
        kind = 'park'
      blocks.append(dict(type=str(kind), rect=rect, interior=interior, walks=walks))
      fill(interior, m['grass'] if kind == 'park' else m['plaza'])
      if kind == 'carpark':
        ix0, iy0, ix1, iy1 = interior
        cp = (ix0 + 20, iy0 + 20, ix1 - 20, iy1 - 20)
        fill(cp, m['carpark'])
        rects['carpark_area'].append(cp)
        carparks.append(cp)
      boxes.append(_block_scenery(rng, kind, interior, walks, rect, sw))

  # Roads: one rectangle per stretch between intersections, one per intersection.
  segments = []
  for axis, pos, hw, cross, chw, extent in (('x', xs, hwx, ys, hwy, size[1]),
                                             ('y', ys, hwy, xs, hwx, size[0])):
    for i, c in enumerate(pos):
      stops = [0] + [v for j in range(len(cross)) for v in (cross[j] - chw[j], cross[j] + chw[j])]
      stops.append(extent)
      for k in range(len(cross) + 1):
        lo, hi = int(stops[2 * k]), int(stops[2 * k + 1])
        segments.append((axis, i, lo, hi))
        road = _rect(axis, c - hw[i], c + hw[i], lo, hi)
        fill(road, m['asphalt'])
        rects['road_segment'].append(road)
        for lane in range(-int(lanes_x[i] if axis == 'x' else lanes_y[i]),
                          int(lanes_x[i] if axis == 'x' else lanes_y[i])):
          rects['lane'].append(_rect(axis, c + lane * LANE_DM, c + (lane + 1) * LANE_DM, lo, hi))
  for i in range(nx):
    for j in range(ny):
      r = (int(xs[i] - hwx[i]), int(ys[j] - hwy[j]), int(xs[i] + hwx[i]), int(ys[j] + hwy[j]))
      fill(r, m['asphalt'])
      rects['intersection'].append(r)

  # Markings on each stretch: zebra and stop line at ends that touch an intersection.
  for axis, i, lo, hi in segments:
    c = int(xs[i] if axis == 'x' else ys[i])
    hw = int(hwx[i] if axis == 'x' else hwy[i])
    lanes = hw // LANE_DM
    a, b = lo, hi
    for end, sign in ((lo, 1), (hi, -1)):
      if end in (0, size[1] if axis == 'x' else size[0]):
        continue
      z0, z1 = sorted((end + sign * 5, end + sign * (5 + ZEBRA_DM)))
      rects['ped_crossing'].append(_rect(axis, c - hw, c + hw, z0, z1))
      for s in range(c - hw + 2, c + hw - 2, 10):
        fill(_rect(axis, s, s + 5, z0, z1), m['zebra'])
      s0, s1 = sorted((end + sign * (10 + ZEBRA_DM), end + sign * (10 + ZEBRA_DM + STOP_DM)))
      # Traffic drives on the right: the lanes approaching this end lie right of the heading.
      heading_pos = sign < 0  # at the hi end traffic arrives heading +axis
      if axis == 'x':
        side = (c, c + hw) if heading_pos else (c - hw, c)
      else:
        side = (c - hw, c) if heading_pos else (c, c + hw)
      stop = _rect(axis, side[0], side[1], s0, s1)
      fill(stop, m['stop_line'])
      rects['stop_line'].append(stop)
      if sign > 0:
        a = s1 + 10
      else:
        b = s0 - 10
    if b - a < 20:
      continue
    fill(_rect(axis, c - 2, c + 2, a, b), m['road_divider'])
    lines['road_divider'].append(_line(axis, c, a, b))
    for k in range(1, lanes):
      for off in (-k * LANE_DM, k * LANE_DM):
        for d0 in range(a, b - 30, 80):
          fill(_rect(axis, c + off - 1, c + off + 1, d0, d0 + 30), m['lane_marking'])
        lines['lane_divider'].append(_line(axis, c + off, a, b))

  rects['drivable_area'] = rects['road_segment'] + rects['intersection'] + rects['carpark_area']
  return Town(location=rig.LOCATIONS[location_index], xs=xs, ys=ys, lanes_x=lanes_x,
              lanes_y=lanes_y, sidewalk_dm=sw, size_dm=size, material=mat,
              texture=_texture(rng, mat.shape), scenery=Boxes.concat(boxes), rects=rects,
              lines=lines, blocks=blocks, carparks=carparks, segments=segments)


def _rect(axis, a0, a1, lo, hi):
  """Rectangle across a road (a: across, lo/hi: along) for a road of constant x or y."""
  if axis == 'x':
    return (int(a0), int(lo), int(a1), int(hi))
  return (int(lo), int(a0), int(hi), int(a1))


def _line(axis, c, lo, hi):
  return ((int(c), int(lo)), (int(c), int(hi))) if axis == 'x' else ((int(lo), int(c)), (int(hi), int(c)))


def _block_scenery(rng, kind, interior, walks, rect, sw) -> Boxes:
  """Buildings, trees and poles of one block (metres, global frame)."""
  x0, y0, x1, y1 = [v * RES for v in interior]
  z = rig.CURB_HEIGHT
  centre, size, yaw, kinds, colour = [], [], [], [], []

  def add(c, s, a, k, col):
    centre.append(c)
    size.append(s)
    yaw.append(a)
    kinds.append(rig.BOX_KIND_ID[k])
    colour.append(col)

  def tree(x, y):
    trunk = rng.uniform(1.8, 3.0)
    crown = rng.uniform(2.5, 5.0)
    a = rng.uniform(0, np.pi)
    add((x, y, z + trunk / 2), (0.3, 0.3, trunk), a, 'tree_trunk', (0.35, 0.25, 0.15))
    add((x, y, z + trunk + crown * 0.45), (crown, crown, crown * 0.9), a, 'tree_crown',
        (rng.uniform(0.1, 0.3), rng.uniform(0.35, 0.6), rng.uniform(0.1, 0.25)))

  if kind == 'buildings':
    nbx, nby = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    bw, bh = (x1 - x0) / nbx, (y1 - y0) / nby
    for i in range(nbx):
      for j in range(nby):
        setback = rng.uniform(1.0, 3.0, size=4)
        cx0, cy0 = x0 + i * bw + setback[0], y0 + j * bh + setback[1]
        cx1, cy1 = x0 + (i + 1) * bw - setback[2], y0 + (j + 1) * bh - setback[3]
        if cx1 - cx0 < 4 or cy1 - cy0 < 4:
          continue
        h = rng.uniform(6.0, 35.0)
        base = rng.uniform(0.35, 0.85)
        col = np.clip(base * np.array([1.0, rng.uniform(0.8, 1.05), rng.uniform(0.7, 1.1)]), 0, 1)
        add(((cx0 + cx1) / 2, (cy0 + cy1) / 2, z + h / 2), (cy1 - cy0, cx1 - cx0, h), 0.0,
            'building', col)
  elif kind == 'park':
    for _ in range(int((x1 - x0) * (y1 - y0) / 150)):
      tree(rng.uniform(x0 + 2, x1 - 2), rng.uniform(y0 + 2, y1 - 2))
  # Street trees and lamp poles along the sidewalks (tree on the inner edge, pole by the curb).
  bx0, by0, bx1, by1 = [v * RES for v in rect]
  s = sw * RES
  for (ax, along0, along1, inner, outer) in (
      ('y', bx0 + s, bx1 - s, by0 + s - 0.6, by0 + 0.5), ('y', bx0 + s, bx1 - s, by1 - s + 0.6, by1 - 0.5),
      ('x', by0 + s, by1 - s, bx0 + s - 0.6, bx0 + 0.5), ('x', by0 + s, by1 - s, bx1 - s + 0.6, bx1 - 0.5)):
    for t in np.arange(along0 + rng.uniform(2, 8), along1 - 2, rng.uniform(9, 16)):
      if rng.random() < 0.7:
        tree(*((t, inner) if ax == 'y' else (inner, t)))
    for t in np.arange(along0 + rng.uniform(3, 10), along1 - 2, rng.uniform(20, 30)):
      h = rng.uniform(5.0, 8.0)
      x, y = (t, outer) if ax == 'y' else (outer, t)
      add((x, y, z + h / 2), (0.25, 0.25, h), 0.0, 'pole', (0.45, 0.47, 0.5))
  if not yaw:
    return Boxes.empty()
  return make_boxes(centre, size, yaw, kinds, colour)
