"""Camera shading of cast rays: sky gradient, textured ground, patterned boxes, light fog.

Each kind of surface is shaded on the rays that hit it only (flat index sets), so the cost
follows the number of pixels of each kind rather than the image size times the number of
patterns. Positions are global (x east, y north, z up), metres.
"""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import raycast, rig
from data_prep.synthetic.boxes import Boxes
from data_prep.synthetic.town import Town

SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])
HORIZON = np.array([0.80, 0.85, 0.90], np.float32)
ZENITH = np.array([0.40, 0.56, 0.85], np.float32)
FOG_DISTANCE = 350.0  # metres: visibility falls to 1/e

_WINDOW = np.array([0.18, 0.24, 0.33], np.float32)
_WHEEL = np.array([0.06, 0.06, 0.07], np.float32)
_GLASS = np.array([0.14, 0.17, 0.22], np.float32)
_SKIN = np.array([0.86, 0.66, 0.52], np.float32)
_WHITE = np.array([0.95, 0.95, 0.95], np.float32)
_RED = np.array([0.85, 0.1, 0.1], np.float32)


def shade(town: Town, boxes: Boxes, origin: np.ndarray, dirs: np.ndarray,
          hits: raycast.Hits) -> np.ndarray:
  """RGB uint8 [R, C, 3] of the ray grid dirs [3, R, C] (planar) from origin [3] with its Hits."""
  r, c = hits.t.shape
  flat = dirs.reshape(3, -1)
  hit, t = hits.hit.ravel(), hits.t.ravel()
  rgb = np.empty((3, r * c), np.uint8)  # planar: 1-D gathers and scatters per channel

  def write(index, col, ray_t=None):
    """Colours col [3, M] of rays `index`, through fog over the ray length t * |d| if given."""
    if ray_t is not None:
      dx, dy, dz = (flat[k].take(index) for k in range(3))
      dist = ray_t.astype(np.float32) * np.sqrt(dx * dx + dy * dy + dz * dz)
      fog = np.float32(1.0) - np.exp(dist * np.float32(-1.0 / FOG_DISTANCE))
      col += (HORIZON[:, None] - col) * fog
    col *= np.float32(255.0)
    col += np.float32(0.5)
    np.minimum(col, np.float32(255.0), out=col)
    for ch in range(3):
      rgb[ch, index] = col[ch].astype(np.uint8)

  sky = np.flatnonzero(hit == raycast.SKY)
  dx, dy, dz = (flat[k].take(sky) for k in range(3))
  elev = np.clip(dz / np.sqrt(dx * dx + dy * dy + dz * dz), 0.0, 1.0)
  write(sky, HORIZON[:, None] + (ZENITH - HORIZON)[:, None] * elev)

  ground = np.flatnonzero(hit < 0)
  ground = ground[hit.take(ground) != raycast.SKY]
  tg = t.take(ground)
  tex = town.texture_at(origin[0] + tg * flat[0].take(ground), origin[1] + tg * flat[1].take(ground))
  mat = hits.material.ravel().take(ground)
  light = np.where(hit.take(ground) == raycast.CURB, np.float32(0.75),
                   np.float32(0.55 + 0.45 * SUN[2]))
  light *= np.float32(0.82) + np.float32(0.36 / 255) * tex
  write(ground, np.stack([rig.MATERIAL_ALBEDO[:, k].take(mat) for k in range(3)]) * light, tg)

  on_box = np.flatnonzero(hit >= 0)
  tb = t.take(on_box)
  write(on_box, _box_colour(boxes, hit.take(on_box), hits.face.ravel().take(on_box), origin,
                            np.stack([flat[k].take(on_box) for k in range(3)]), tb), tb)
  return np.ascontiguousarray(rgb.T).reshape(r, c, 3)


def _frac(x: np.ndarray) -> np.ndarray:
  return x - np.floor(x)


def _face_light(boxes: Boxes) -> np.ndarray:
  """Lambert term [N, 6] of each box face (face = axis * 2 + positive side, box frame)."""
  c, s = np.cos(boxes.yaw), np.sin(boxes.yaw)
  along = c * SUN[0] + s * SUN[1]  # sun . box x axis (the length)
  across = -s * SUN[0] + c * SUN[1]
  up = np.full_like(c, SUN[2])
  cos_sun = np.stack([-along, along, -across, across, -up, up], 1)
  return (0.5 + 0.5 * np.clip(cos_sun, 0.0, 1.0)).astype(np.float32)


def _box_colour(boxes: Boxes, idx: np.ndarray, face: np.ndarray, origin: np.ndarray,
                d: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Albedo pattern x Lambert shading [3, M] (planar) of box hits: box idx [M], face [M], rays
  d [3, M] from origin hitting at parameter t [M]."""
  col = np.stack([boxes.colour[:, k].astype(np.float32).take(idx) for k in range(3)])
  kind = boxes.kind.take(idx)
  axis = face // 2
  k = rig.BOX_KIND_ID

  # Per box: ray origin relative to the centre, yaw cos/sin, height (gathered per hit below).
  rel0 = origin - boxes.centre
  c_all, s_all = np.cos(boxes.yaw), np.sin(boxes.yaw)

  def local(sel):
    """Hit point of rays `sel` in their box's frame: (x along the length, y, height above the
    box bottom, box height)."""
    i = idx.take(sel)
    ts = t.take(sel)
    rx = rel0[:, 0].take(i) + ts * d[0].take(sel)
    ry = rel0[:, 1].take(i) + ts * d[1].take(sel)
    h = boxes.size[:, 2].take(i)
    zb = rel0[:, 2].take(i) + ts * d[2].take(sel) + h / 2
    c, s = c_all.take(i), s_all.take(i)
    return rx * c + ry * s, ry * c - rx * s, zb, h

  # Per channel: 1-D fancy indexing is several times faster than on [3, M].
  def paint(sel, colour):
    for ch in range(3):
      col[ch, sel] = colour[ch]

  def scale(sel, factor):
    for ch in range(3):
      col[ch, sel] *= factor

  # Buildings: window grid on facades, flat darker roofs.
  sel = np.flatnonzero(kind == k['building'])
  if len(sel):
    lx, ly, zb, _ = local(sel)
    side = axis[sel] < 2
    along = _frac(np.where(axis[sel] == 0, ly, lx) / 3.2)
    up = _frac(zb / 3.4)
    win = side & (along > 0.3) & (along < 0.75) & (up > 0.35) & (up < 0.8) & (zb > 2.0)
    paint(sel[win], _WINDOW)
    scale(sel[~side], np.float32(0.6))
  # Vehicles and two-wheelers: dark wheels band, glass band on the sides.
  sel = np.flatnonzero((kind == k['vehicle']) | (kind == k['cycle']))
  if len(sel):
    _, _, zb, h = local(sel)
    paint(sel[zb < 0.28 * h], _WHEEL)
    paint(sel[(axis[sel] < 2) & (zb > 0.58 * h) & (zb < 0.88 * h)], _GLASS)
  # Pedestrians: head, shirt, trousers.
  sel = np.flatnonzero(kind == k['pedestrian'])
  if len(sel):
    _, _, zb, h = local(sel)
    paint(sel[zb > 0.86 * h], _SKIN)
    scale(sel[zb < 0.47 * h], np.float32(0.35))
  sel = np.flatnonzero(kind == k['cone'])
  if len(sel):
    _, _, zb, h = local(sel)
    paint(sel[(zb > 0.45 * h) & (zb < 0.65 * h)], _WHITE)
  sel = np.flatnonzero(kind == k['barrier'])
  if len(sel):
    lx, _, _, _ = local(sel)
    paint(sel[_frac(lx / 0.6) < 0.5], _RED)
  sel = np.flatnonzero(kind == k['tree_crown'])
  if len(sel):
    p = origin[:, None] + t.take(sel) * np.stack([d[k].take(sel) for k in range(3)])
    grain = 0.75 + 0.5 * (0.5 + 0.5 * np.sin(p[0] * 5.1 + np.sin(p[1] * 4.3) * 3 + p[2] * 6.7))
    scale(sel, grain.astype(np.float32))
  light = _face_light(boxes).ravel().take(idx.astype(np.int64) * 6 + face)
  return col * light
