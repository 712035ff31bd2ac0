"""Scene dynamics: the ego's route along lanes, moving traffic, pedestrians and parked objects.

A scene is fully determined by (seed, scene index, its town). Positions in the global frame,
metres; times in seconds from the scene start.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data_prep.synthetic import rig
from data_prep.synthetic.boxes import Boxes, make_boxes
from data_prep.synthetic.town import LANE_DM, RES, Town

_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))
ROUTE_STEP = 0.25  # metres between route samples


class Route:
  """A lane-following path, resampled every 0.25 m: position and heading by arclength."""

  def __init__(self, points: np.ndarray):
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-6])
    points = points[keep]
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    self.length = float(s[-1])
    self.s = np.arange(0.0, self.length, ROUTE_STEP)
    self.xy = np.stack([np.interp(self.s, s, points[:, 0]), np.interp(self.s, s, points[:, 1])], 1)
    d = np.gradient(self.xy, axis=0)
    self.heading = np.unwrap(np.arctan2(d[:, 1], d[:, 0]))

  def at(self, s):
    """(x, y, yaw) at arclength s (clamped to the route)."""
    s = np.clip(s, 0.0, self.s[-1])
    return (np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1]),
            np.interp(s, self.s, self.heading))


def random_route(town: Town, rng, min_length: float) -> Route:
  """Random walk over the road grid in the innermost right-hand lane, no U-turns."""
  nx, ny = len(town.xs), len(town.ys)
  node = (int(rng.integers(nx)), int(rng.integers(ny)))
  valid = lambda n: 0 <= n[0] < nx and 0 <= n[1] < ny
  d = int(rng.integers(4))
  while not valid((node[0] + _DIRS[d][0], node[1] + _DIRS[d][1])):
    d = (d + 1) % 4
  pos = lambda n: np.array([town.xs[n[0]], town.ys[n[1]]], np.float64) * RES
  off = LANE_DM * RES / 2
  right = lambda k: np.array([_DIRS[k][1], -_DIRS[k][0]], np.float64)
  points = [pos(node) + off * right(d)]
  length = 0.0
  while length < min_length:
    nxt = (node[0] + _DIRS[d][0], node[1] + _DIRS[d][1])
    length += np.linalg.norm(pos(nxt) - pos(node))
    node = nxt
    options = [k for k in ((d + 1) % 4, (d + 3) % 4, d, d)
               if valid((node[0] + _DIRS[k][0], node[1] + _DIRS[k][1]))]
    k = options[int(rng.integers(len(options)))]
    c = pos(node)
    if k == d:
      points.append(c + off * right(d))
      continue
    # Turn: quadratic Bezier from the intersection entry to its exit around the lane corner.
    r_in = town.half_width_dm('y' if d % 2 == 0 else 'x', node[1] if d % 2 == 0 else node[0]) * RES
    r_out = town.half_width_dm('x' if d % 2 == 0 else 'y', node[0] if d % 2 == 0 else node[1]) * RES
    p0 = c + off * right(d) - r_in * np.array(_DIRS[d], np.float64)
    p2 = c + off * right(k) + r_out * np.array(_DIRS[k], np.float64)
    p1 = c + off * right(d) + off * right(k)
    u = np.linspace(0, 1, 12)[:, None]
    points.extend(list((1 - u) ** 2 * p0 + 2 * u * (1 - u) * p1 + u ** 2 * p2))
    d = k
  nxt = (node[0] + _DIRS[d][0], node[1] + _DIRS[d][1])
  points.append(pos(nxt) + off * right(d) if valid(nxt) else pos(node) + off * right(d))
  return Route(np.array(points))


@dataclasses.dataclass
class SceneObject:
  """One annotated object. Static ones have route None and a fixed pose."""
  cls: str
  size: tuple  # (w, l, h)
  colour: tuple
  pose: tuple = (0.0, 0.0, 0.0, 0.0)  # x, y, z of the box bottom, yaw
  route: Route | None = None
  speed: float = 0.0
  s0: float = 0.0
  bounce: bool = False  # pedestrians pace back and forth along their route
  attribute: str = ''


@dataclasses.dataclass
class Scene:
  """Ego route and speed profile plus the scene's objects."""
  route: Route
  v0: float
  phase: float
  objects: list
  z_of: dict  # unused placeholder for per-object ground heights

  def ego_s(self, t):
    w = 2 * np.pi / 9.0
    return 5.0 + self.v0 * (t - 0.15 / w * (np.cos(w * t + self.phase) - np.cos(self.phase)))

  def ego_pose(self, t: float):
    """(x, y, yaw) of the ego (rear axle centre on the ground) at time t seconds."""
    x, y, yaw = self.route.at(self.ego_s(t))
    return float(x), float(y), float(yaw)

  def boxes_at(self, t: float) -> Boxes:
    """Object boxes (instance = index into `objects`) at time t, with velocities."""
    return self._tracks.boxes_at(t)

  @functools.cached_property
  def _tracks(self) -> '_Tracks':
    return _Tracks(self.objects)


class _Tracks:
  """The objects of a scene as arrays, so that their boxes at any time take a few vectorised
  operations. Routes are concatenated; all are sampled every ROUTE_STEP metres from 0."""

  def __init__(self, objects: list):
    n = len(objects)
    self.size = np.array([o.size for o in objects], np.float64).reshape(n, 3)
    self.kind = np.array([rig.BOX_KIND_ID[rig.CLASSES[o.cls][2]] for o in objects], np.int32)
    self.colour = np.array([o.colour for o in objects], np.float64).reshape(n, 3)
    pose = np.array([o.pose for o in objects], np.float64).reshape(n, 4)
    self.static = pose
    self.moving = np.array([i for i, o in enumerate(objects) if o.route is not None], np.int64)
    routes = [objects[i].route for i in self.moving]
    self.speed = np.array([objects[i].speed for i in self.moving], np.float64)
    self.s0 = np.array([objects[i].s0 for i in self.moving], np.float64)
    self.bounce = np.array([objects[i].bounce for i in self.moving], bool)
    self.length = np.array([r.length for r in routes], np.float64)
    counts = np.array([len(r.s) for r in routes], np.int64)
    self.offset = np.cumsum(counts) - counts
    self.last = counts - 1
    self.s_last = np.array([r.s[-1] for r in routes], np.float64)
    self.track = np.concatenate([np.concatenate([r.xy, r.heading[:, None]], 1) for r in routes]
                                ) if routes else np.zeros((0, 3))

  def _interp(self, s: np.ndarray) -> np.ndarray:
    """[M, 3] (x, y, yaw) of every moving object at arclength s [M], clamped to its route; the
    piecewise-linear interpolation of Route.at on the uniform ROUTE_STEP grid."""
    s = np.clip(s, 0.0, self.s_last)
    j = np.minimum(np.floor(s / ROUTE_STEP).astype(np.int64), self.last)
    a = self.track[self.offset + j]
    b = self.track[self.offset + np.minimum(j + 1, self.last)]
    return a + (b - a) * ((s - j * ROUTE_STEP) / ROUTE_STEP)[:, None]

  def boxes_at(self, t: float) -> Boxes:
    x, y, z, yaw = self.static.T.copy()
    vel = np.zeros((len(x), 2))
    if len(self.moving):
      s = self.s0 + self.speed * t
      period = 2 * self.length
      wrapped = s % np.where(self.bounce, period, 1.0)
      back = self.bounce & (wrapped >= self.length)
      s = np.where(self.bounce, np.where(back, period - wrapped, wrapped), s)
      pos = self._interp(s)
      heading = pos[:, 2] + np.where(back, np.pi, 0.0)
      moving = (self.speed > 0) & (self.bounce | (s < self.length))
      m = self.moving
      x[m], y[m], yaw[m] = pos[:, 0], pos[:, 1], heading
      vel[m] = np.where(moving[:, None],
                        np.stack([np.cos(heading), np.sin(heading)], 1) * self.speed[:, None], 0.0)
    centre = np.stack([x, y, z + self.size[:, 2] / 2], 1)
    return make_boxes(centre, self.size, yaw, self.kind, self.colour, np.arange(len(x)), vel)


def _size(rng, cls):
  w, l, h = rig.CLASSES[cls][1]
  f = rng.uniform(0.9, 1.1, size=3)
  return (round(w * f[0], 3), round(l * f[1], 3), round(h * f[2], 3))


def _vehicle_colour(rng):
  palette = np.array([[0.9, 0.9, 0.9], [0.1, 0.1, 0.12], [0.6, 0.6, 0.62], [0.7, 0.1, 0.1],
                      [0.1, 0.2, 0.6], [0.85, 0.75, 0.2], [0.2, 0.45, 0.25], [0.5, 0.3, 0.2]])
  return tuple(np.clip(palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.1), 0, 1))


def build_scene(town: Town, seed: int, scene_index: int, duration: float) -> Scene:
  """The scene's ego route and objects (deterministic in seed and scene index)."""
  rng = np.random.default_rng([seed, 104729, scene_index])
  v0 = float(rng.uniform(5.0, 10.0))
  route = random_route(town, rng, v0 * 1.2 * duration + 40.0)
  objects = []
  cz = rig.CURB_HEIGHT
  # Moving traffic on random routes.
  for _ in range(int(rng.integers(10, 18))):
    cls = rng.choice(['car', 'truck', 'bus', 'motorcycle', 'bicycle'], p=[0.7, 0.1, 0.08, 0.06, 0.06])
    speed = rng.uniform(2.5, 5.0) if cls == 'bicycle' else rng.uniform(4.0, 11.0)
    r = random_route(town, rng, speed * duration + 80.0)
    objects.append(SceneObject(str(cls), _size(rng, cls), _vehicle_colour(rng), (0, 0, 0.0, 0), r,
                               float(speed), float(rng.uniform(0, 60)),
                               attribute='cycle.with_rider' if cls in ('bicycle', 'motorcycle')
                               else 'vehicle.moving'))
  # Curb-side parking and road works in the outer lane of two-lane roads.
  for axis, i, lo, hi in town.segments:
    lanes = int((town.lanes_x if axis == 'x' else town.lanes_y)[i])
    if lanes < 2 or hi - lo < 300:
      continue
    c = (town.xs if axis == 'x' else town.ys)[i] * RES
    for side in (-1, 1):
      across = c + side * 1.5 * LANE_DM * RES
      heading = (np.pi / 2 if axis == 'x' else 0.0) + (0.0 if side * (1 if axis == 'x' else -1) > 0 else np.pi)
      t = lo * RES + 12.0
      works = rng.random() < 0.2
      while t < hi * RES - 20.0:
        x, y = (across, t) if axis == 'x' else (t, across)
        if works:
          cls = 'traffic_cone' if rng.random() < 0.7 else 'barrier'
          objects.append(SceneObject(cls, _size(rng, cls),
                                     (0.95, 0.45, 0.1) if cls == 'traffic_cone' else (0.9, 0.2, 0.2),
                                     (x, y, 0.0, heading)))
          t += rng.uniform(2.5, 4.0)
          continue
        cls = rng.choice(['none', 'car', 'truck', 'trailer', 'construction_vehicle', 'bus'],
                         p=[0.35, 0.4, 0.1, 0.05, 0.05, 0.05])
        if cls != 'none':
          size = _size(rng, cls)
          objects.append(SceneObject(str(cls), size, _vehicle_colour(rng),
                                     (x, y, 0.0, heading), attribute='vehicle.parked'))
        t += 14.0
  # Car parks: rows of bays either side of an aisle.
  for x0, y0, x1, y1 in town.carparks:
    x0, y0, x1, y1 = x0 * RES, y0 * RES, x1 * RES, y1 * RES
    for row_y, yaw in ((y0 + 3.0, np.pi / 2), (y1 - 3.0, -np.pi / 2), ((y0 + y1) / 2 - 3.0, np.pi / 2),
                       ((y0 + y1) / 2 + 3.0, -np.pi / 2)):
      for x in np.arange(x0 + 2.0, x1 - 2.0, 2.8):
        if rng.random() < 0.55:
          objects.append(SceneObject('car', _size(rng, 'car'), _vehicle_colour(rng),
                                     (float(x), float(row_y), 0.0, float(yaw)), attribute='vehicle.parked'))
  # Sidewalks: pedestrians pacing along them, parked two-wheelers, barriers.
  for block in town.blocks:
    for k, (wx0, wy0, wx1, wy1) in enumerate(block['walks']):
      wx0, wy0, wx1, wy1 = wx0 * RES, wy0 * RES, wx1 * RES, wy1 * RES
      along_x = k < 2
      for _ in range(int(rng.poisson(1.2))):
        f = rng.uniform(0.3, 0.7)
        if along_x:
          y = wy0 + f * (wy1 - wy0)
          pts = np.array([[wx0 + 1.0, y], [wx1 - 1.0, y]])
        else:
          x = wx0 + f * (wx1 - wx0)
          pts = np.array([[x, wy0 + 1.0], [x, wy1 - 1.0]])
        if rng.random() < 0.5:
          pts = pts[::-1]
        standing = rng.random() < 0.25
        r = Route(pts)
        objects.append(SceneObject('pedestrian', _size(rng, 'pedestrian'),
                                   tuple(rng.uniform(0.1, 0.9, 3)), (0, 0, cz, 0), r,
                                   0.0 if standing else float(rng.uniform(0.9, 1.6)),
                                   float(rng.uniform(0, r.length)), True,
                                   'pedestrian.standing' if standing else 'pedestrian.moving'))
      if rng.random() < 0.15:
        cls = 'bicycle' if rng.random() < 0.6 else 'motorcycle'
        f = rng.uniform(0.2, 0.8)
        x, y = (wx0 + f * (wx1 - wx0), (wy0 + wy1) / 2) if along_x else ((wx0 + wx1) / 2, wy0 + f * (wy1 - wy0))
        objects.append(SceneObject(cls, _size(rng, cls), _vehicle_colour(rng),
                                   (x, y, cz, np.pi / 2 if along_x else 0.0), attribute='cycle.without_rider'))
      if rng.random() < 0.05:
        f = rng.uniform(0.2, 0.6)
        for j in range(int(rng.integers(2, 5))):
          x, y = ((wx0 + f * (wx1 - wx0) + 2.6 * j, (wy0 + wy1) / 2) if along_x
                  else ((wx0 + wx1) / 2, wy0 + f * (wy1 - wy0) + 2.6 * j))
          objects.append(SceneObject('barrier', _size(rng, 'barrier'), (0.9, 0.9, 0.85),
                                     (x, y, cz, 0.0 if along_x else np.pi / 2)))
  objects += _class_showcase(route, np.random.default_rng([seed, 7919, scene_index]))
  return Scene(route, v0, float(rng.uniform(0, 2 * np.pi)), objects, {})


# One parked object of every detection class behind the ego's start (the route begins at an
# intersection 5 m behind it, so this is open road): (class, metres behind the ego, metres to
# its left). Near the ego the small classes, farther out the large ones, fanned out so that each
# is hit by LiDAR. nuScenes' DetectionEval averages AP and TP errors over all ten classes, a
# class missing from a split scoring 0, so every scene shows every class.
_SHOWCASE = (('traffic_cone', 7.0, -2.5), ('barrier', 7.0, 2.5), ('pedestrian', 9.0, 0.0),
             ('bicycle', 10.0, -5.0), ('motorcycle', 10.0, 5.0), ('car', 18.0, -3.0),
             ('construction_vehicle', 20.0, 4.5), ('truck', 25.0, 0.5), ('bus', 32.0, -5.0),
             ('trailer', 34.0, 5.5))


def _class_showcase(route: Route, rng) -> list:
  """The _SHOWCASE objects, parallel to the ego's start heading (own rng: the rest of the scene
  is what it was without them)."""
  x0, y0, yaw = (float(v) for v in route.at(5.0))  # Scene.ego_s(0) = 5
  forward, left = np.array([np.cos(yaw), np.sin(yaw)]), np.array([-np.sin(yaw), np.cos(yaw)])
  objects = []
  for cls, back, side in _SHOWCASE:
    x, y = np.array([x0, y0]) - back * forward + side * left
    kind = rig.CLASSES[cls][2]
    attribute = {'vehicle': 'vehicle.parked', 'cycle': 'cycle.without_rider',
                 'pedestrian': 'pedestrian.standing'}.get(kind, '')
    objects.append(SceneObject(cls, _size(rng, cls), _vehicle_colour(rng),
                               (float(x), float(y), 0.0, yaw), attribute=attribute))
  return objects
