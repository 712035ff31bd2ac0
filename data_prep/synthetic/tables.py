"""nuScenes table rows shared by all scenes: tokens, sensors, categories, attributes, visibility."""

from __future__ import annotations

import hashlib
import json
import os

from data_prep.synthetic import rig


def token(*parts) -> str:
  """Deterministic 32-hex token of its parts (nuScenes tokens are 32 hex characters)."""
  return hashlib.md5('|'.join(str(p) for p in parts).encode()).hexdigest()


def sensor_rows() -> list:
  rows = [dict(token=token('sensor', rig.LIDAR), channel=rig.LIDAR, modality='lidar')]
  rows += [dict(token=token('sensor', c), channel=c, modality='camera') for c in rig.CAMERAS]
  return rows


def category_rows() -> list:
  return [dict(token=token('category', name), name=name,
               description=f'synthetic {cls} ({name})', index=i)
          for i, (cls, (name, _, _)) in enumerate(rig.CLASSES.items())]


def attribute_rows() -> list:
  return [dict(token=token('attribute', a), name=a, description=a) for a in rig.ATTRIBUTES]


def visibility_rows() -> list:
  return [dict(token=t, level=level, description=f'visibility of whole object is {level}')
          for t, level in rig.VISIBILITY]


def write_table(path: str, rows) -> None:
  """One table as JSON (deterministic formatting): a list gets one row per line. json.dumps
  without indent runs the C encoder (json.dump and any indent run the pure-Python one)."""
  if isinstance(rows, list):
    text = '[\n' + ',\n'.join(json.dumps(r, separators=(',', ':')) for r in rows) + '\n]'
  else:
    text = json.dumps(rows, separators=(',', ':'))
  with open(path, 'w') as f:
    f.write(text)


def write_tables(root: str, tables: dict) -> None:
  os.makedirs(root, exist_ok=True)
  for name, rows in tables.items():
    write_table(os.path.join(root, f'{name}.json'), rows)
