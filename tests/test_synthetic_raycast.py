"""Synthetic world internals against slow references: ray casting, spans, object tracks, point
counts, table files."""

from __future__ import annotations

import json
import math

import numpy as np
from pyquaternion import Quaternion

from data_prep.synthetic import raycast, rig
from data_prep.synthetic.boxes import make_boxes
from data_prep.synthetic.devkit_count import SortedPoints, count_points_in_box
from data_prep.synthetic.simulate import Settings, build_world
from data_prep.synthetic.tables import write_table


class _FlatTown:
  """Asphalt everywhere: the ground is the plane z = 0."""

  @staticmethod
  def material_at(x, y):
    return np.zeros(np.shape(x), np.uint8)


def _boxes(rng, n):
  centre = np.stack([rng.uniform(-15, 15, n), rng.uniform(4, 30, n), rng.uniform(0.5, 3.0, n)], 1)
  size = rng.uniform(0.5, 6.0, (n, 3))
  return make_boxes(centre, size, rng.uniform(-np.pi, np.pi, n), rng.integers(0, 9, n),
                    rng.uniform(0, 1, (n, 3)))


def _reference_cast(boxes, origin, dirs, max_t):
  """Nearest hit per ray of dirs [M, 3] by a scalar float64 slab test of every box, plus the
  z = 0 plane: (t [M], hit [M], face [M], box_any [N])."""
  t_out, hit_out, face_out = [], [], []
  box_any = np.zeros(len(boxes), np.int64)
  for d in dirs.astype(np.float64):
    best_t = -origin[2] / d[2] if d[2] < -1e-9 else np.inf
    best, best_face = (raycast.GROUND if np.isfinite(best_t) else raycast.SKY), 0
    for i in range(len(boxes)):
      c, s = math.cos(boxes.yaw[i]), math.sin(boxes.yaw[i])
      rel = origin - boxes.centre[i]
      o = (rel[0] * c + rel[1] * s, -rel[0] * s + rel[1] * c, rel[2])
      dl = (d[0] * c + d[1] * s, -d[0] * s + d[1] * c, d[2])
      half = 0.5 * boxes.size[i, [1, 0, 2]]
      lows, tfar = [], np.inf
      for a in range(3):
        with np.errstate(divide='ignore'):
          t1, t2 = (-half[a] - o[a]) / dl[a], (half[a] - o[a]) / dl[a]
        lows.append(min(t1, t2))
        tfar = min(tfar, max(t1, t2))
      tnear = max(lows)
      if tnear <= tfar and 1e-3 < tnear < max_t:
        box_any[i] += 1
        if tnear < best_t:
          axis = int(np.argmax(lows))
          best_t, best, best_face = tnear, i, axis * 2 + (dl[axis] < 0)
    if best_t > max_t:
      best_t, best = np.inf, raycast.SKY
    t_out.append(best_t)
    hit_out.append(best)
    face_out.append(best_face)
  return np.array(t_out), np.array(hit_out), np.array(face_out), box_any


def _camera_dirs(rot, k, width, height, dtype):
  u = (np.arange(width) + 0.5 - k[0, 2]) / k[0, 0]
  v = (np.arange(height) + 0.5 - k[1, 2]) / k[1, 1]
  d_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), 0)
  return np.einsum('ij,jhw->ihw', rot, d_cam).astype(dtype)  # [3, H, W] planar


def test_cast_grid_matches_scalar_reference_and_spans_lose_nothing():
  rng = np.random.default_rng(5)
  boxes = _boxes(rng, 12)
  origin = np.array([0.3, -0.2, 1.6])
  rot = rig.rot_z(math.pi / 2) @ rig.CAM_AXES  # camera looking along +y
  width, height = 48, 27
  k = rig.camera_intrinsic('CAM_FRONT', width, height)
  dirs = _camera_dirs(rot, k, width, height, np.float64)
  everywhere = np.array([(i, 0, height, 0, width) for i in range(len(boxes))])
  full = raycast.cast_grid(_FlatTown(), boxes, origin, dirs, everywhere, 60.0)
  t, hit, face, box_any = _reference_cast(boxes, origin, dirs.reshape(3, -1).T, 60.0)
  assert (hit >= 0).sum() > 200 and len(set(hit[hit >= 0])) >= 5  # the scene is not trivial
  np.testing.assert_array_equal(full.hit.ravel(), hit)
  np.testing.assert_allclose(full.t.ravel(), t, rtol=1e-12)
  on_box = hit >= 0
  np.testing.assert_array_equal(full.face.ravel()[on_box], face[on_box])
  np.testing.assert_array_equal(full.box_any, box_any)
  # Screen-space spans only drop pairs that cannot hit.
  spans = raycast.camera_spans(boxes, np.arange(len(boxes)), origin, rot, k, width, height)
  assert sum((r1 - r0) * (c1 - c0) for _, r0, r1, c0, c1 in spans) < 0.8 * len(boxes) * width * height
  culled = raycast.cast_grid(_FlatTown(), boxes, origin, dirs, spans, 60.0)
  for name in ('t', 'hit', 'face', 'box_any'):
    np.testing.assert_array_equal(getattr(culled, name), getattr(full, name), err_msg=name)
  # float32 rays (the camera path) agree to float32 precision.
  single = raycast.cast_grid(_FlatTown(), boxes, origin, dirs.astype(np.float32), spans, 60.0)
  assert np.mean(single.hit == full.hit) > 0.995
  same = single.hit == full.hit
  np.testing.assert_allclose(single.t[same], full.t[same], rtol=1e-5)


def test_lidar_spans_lose_no_pair_that_hits():
  rng = np.random.default_rng(7)
  boxes = _boxes(rng, 15)
  boxes.centre[:, :2] -= (0.0, 15.0)  # all around the sensor, one box over it
  boxes.centre[0] = (0.0, 0.0, 1.0)
  origin = np.array([0.0, 0.0, 1.84])
  elevations = np.radians(rig.LIDAR_ELEVATIONS_DEG)
  cols = 360
  azimuth0 = 0.7
  az = azimuth0 + 2 * np.pi * np.arange(cols)[None, :] / cols
  el = elevations[:, None]
  dirs = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                                      np.sin(el) + 0 * az))
  spans = raycast.lidar_spans(boxes, np.arange(len(boxes)), origin, azimuth0, cols, elevations)
  everywhere = np.array([(i, 0, len(elevations), 0, cols) for i in range(len(boxes))])
  area = sum((r1 - r0) * (c1 - c0) for _, r0, r1, c0, c1 in spans)
  assert area < 0.5 * len(everywhere) * len(elevations) * cols
  got = raycast.cast_grid(_FlatTown(), boxes, origin, dirs, spans, 100.0)
  want = raycast.cast_grid(_FlatTown(), boxes, origin, dirs, everywhere, 100.0)
  assert (want.hit >= 0).sum() > 500
  for name in ('t', 'hit', 'face', 'box_any'):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def _reference_boxes_at(scene, t):
  """Object poses by evaluating each object's Route.at in a Python loop."""
  out = []
  for o in scene.objects:
    if o.route is None:
      x, y, z, a = o.pose
    else:
      s, flip = o.s0 + o.speed * t, False
      if o.bounce:
        period = 2 * o.route.length
        s = s % period
        flip = s >= o.route.length
        s = period - s if flip else s
      x, y, a = o.route.at(s)
      a, z = a + (np.pi if flip else 0.0), o.pose[2]
    out.append((x, y, z + o.size[2] / 2, a))
  return np.array(out, np.float64)


def test_vectorised_tracks_match_route_interpolation():
  world = build_world(Settings(0, 2, 0, 4, 1, 64, 36), 1)
  assert sum(o.route is not None for o in world.scene.objects) >= 10
  for t in (0.0, 0.5, 3.25, 11.9, 400.0):  # 400 s: past the end of every traffic route
    boxes = world.scene.boxes_at(t)
    want = _reference_boxes_at(world.scene, t)
    np.testing.assert_allclose(boxes.centre, want[:, :3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(boxes.yaw, want[:, 3], rtol=0, atol=1e-12)
    speed = np.hypot(*boxes.velocity.T)
    movers = [i for i, o in enumerate(world.scene.objects) if o.bounce and o.speed > 0]
    np.testing.assert_allclose(speed[movers], [world.scene.objects[i].speed for i in movers])


def test_sorted_points_count_equals_full_count():
  rng = np.random.default_rng(3)
  boxes = [(rng.uniform(-18, 18, 3), rng.uniform(0.5, 8.0, 3),
            Quaternion(axis=rng.normal(size=3), angle=rng.uniform(-np.pi, np.pi))) for _ in range(40)]
  # Points inside, outside, and on the corners (the far end of each box's x range).
  signs = np.array(list(np.ndindex(2, 2, 2))) * 2 - 1  # [8, 3]
  corners = [c + (signs * wlh[[1, 0, 2]] / 2) @ o.rotation_matrix.T for c, wlh, o in boxes]
  points = np.concatenate([rng.uniform(-20, 20, (20000, 3))] + corners).astype(np.float32)
  index = SortedPoints(points)
  total = 0
  for center, wlh, orientation in boxes:
    want = count_points_in_box(center, wlh, orientation, points.T)
    assert index.count_in_box(center, wlh, orientation) == want
    total += want
  assert total > 500


def test_write_table_one_row_per_line(tmp_path):
  rows = [dict(token='a', value=[1.5, 2], nested=dict(x='é')), dict(token='b', value=[], nested={})]
  path = tmp_path / 't.json'
  write_table(str(path), rows)
  assert json.loads(path.read_text()) == rows
  assert len(path.read_text().splitlines()) == len(rows) + 2
  write_table(str(path), [])
  assert json.loads(path.read_text()) == []
