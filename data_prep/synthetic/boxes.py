"""Oriented boxes (yaw only): the one solid primitive of the world, for objects and scenery."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Boxes:
  """N boxes in the global frame.

  centre [N, 3] (z at the box middle), size [N, 3] as nuScenes (width, length, height) with the
  length along the heading, yaw [N] radians about z, kind [N] int (rig.BOX_KINDS), colour [N, 3]
  albedo 0-1, instance [N] int (index into the scene's objects, -1 for scenery),
  velocity [N, 2] m/s in the global frame.
  """
  centre: np.ndarray
  size: np.ndarray
  yaw: np.ndarray
  kind: np.ndarray
  colour: np.ndarray
  instance: np.ndarray
  velocity: np.ndarray

  def __len__(self) -> int:
    return len(self.yaw)

  @staticmethod
  def empty() -> 'Boxes':
    return Boxes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int32),
                 np.zeros((0, 3), np.float32), np.zeros(0, np.int32), np.zeros((0, 2)))

  @staticmethod
  def concat(parts) -> 'Boxes':
    parts = [p for p in parts if len(p)]
    if not parts:
      return Boxes.empty()
    return Boxes(*[np.concatenate([getattr(p, f.name) for p in parts])
                   for f in dataclasses.fields(Boxes)])

  def select(self, index) -> 'Boxes':
    return Boxes(*[getattr(self, f.name)[index] for f in dataclasses.fields(Boxes)])

  def corners(self) -> np.ndarray:
    """[N, 8, 3] corners in the global frame."""
    sx = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * 0.5
    sy = np.array([1, -1, 1, -1, 1, -1, 1, -1]) * 0.5
    sz = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    lx = self.size[:, 1:2] * sx  # length along the heading
    ly = self.size[:, 0:1] * sy
    lz = self.size[:, 2:3] * sz
    c, s = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
    x = self.centre[:, 0:1] + c * lx - s * ly
    y = self.centre[:, 1:2] + s * lx + c * ly
    z = self.centre[:, 2:3] + lz
    return np.stack([x, y, z], -1)


def make_boxes(centre, size, yaw, kind, colour, instance=None, velocity=None) -> Boxes:
  n = len(yaw)
  return Boxes(np.asarray(centre, np.float64).reshape(n, 3), np.asarray(size, np.float64).reshape(n, 3),
               np.asarray(yaw, np.float64).reshape(n), np.asarray(kind, np.int32).reshape(n),
               np.asarray(colour, np.float32).reshape(n, 3),
               np.full(n, -1, np.int32) if instance is None else np.asarray(instance, np.int32),
               np.zeros((n, 2)) if velocity is None else np.asarray(velocity, np.float64).reshape(n, 2))
