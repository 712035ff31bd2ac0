"""Map expansion JSON (read by nuscenes.map_expansion NuScenesMap) and the map PNG of a town.

Polygons and divider lines come from the same decimetre rectangles the ground raster is painted
with, so the map agrees with the rendered world to the raster's 0.1 m.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
from PIL import Image

from data_prep.synthetic import rig
from data_prep.synthetic.tables import token
from data_prep.synthetic.town import RES, Town

_POLYGON_LAYERS = ('drivable_area', 'road_segment', 'road_block', 'lane', 'ped_crossing', 'walkway',
                   'stop_line', 'carpark_area', 'road_divider', 'lane_divider', 'traffic_light',
                   'lane_connector')


def empty_map(location: str) -> dict:
  out = dict(version='1.3', canvas_edge=[100.0, 100.0], polygon=[], line=[], node=[],
             arcline_path_3={}, connectivity={})
  for layer in _POLYGON_LAYERS:
    out[layer] = []
  out['map_name'] = location
  return out


def town_map(town: Town, seed: int) -> dict:
  """The expansion JSON dict of `town`. Nodes are jittered by < 1 mm (devkit/Shapely-2 edge bug)."""
  m = empty_map(town.location)
  m['canvas_edge'] = [town.size_dm[0] * RES, town.size_dm[1] * RES]
  rng = np.random.default_rng([seed, 31337, rig.LOCATIONS.index(town.location)])
  key = f'{seed}/{town.location}'

  def node(x, y, name):
    tok = token(key, 'node', name)
    j = rng.uniform(-8e-4, 8e-4, 2)
    m['node'].append(dict(token=tok, x=round(x * RES + j[0], 5), y=round(y * RES + j[1], 5)))
    return tok

  def polygon(rect, name):
    x0, y0, x1, y1 = rect
    nodes = [node(x, y, f'{name}/{k}') for k, (x, y) in
             enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1)))]
    tok = token(key, 'polygon', name)
    m['polygon'].append(dict(token=tok, exterior_node_tokens=nodes, holes=[]))
    return tok

  def line(seg, name):
    nodes = [node(x, y, f'{name}/{k}') for k, (x, y) in enumerate(seg)]
    tok = token(key, 'line', name)
    m['line'].append(dict(token=tok, node_tokens=nodes))
    return tok

  poly_of = {}
  for i, r in enumerate(town.rects['road_segment'] + town.rects['intersection']):
    poly_of[('road', r)] = polygon(r, f'road/{i}')
  for i, r in enumerate(town.rects['carpark_area']):
    poly_of[('carpark', r)] = polygon(r, f'carpark/{i}')
  da = token(key, 'drivable_area')
  m['drivable_area'].append(dict(token=da, polygon_tokens=list(poly_of.values())))
  for i, r in enumerate(town.rects['road_segment'] + town.rects['intersection']):
    m['road_segment'].append(dict(token=token(key, 'road_segment', i), polygon_token=poly_of[('road', r)],
                                  is_intersection=i >= len(town.rects['road_segment']),
                                  drivable_area_token=da))
  for i, r in enumerate(town.rects['carpark_area']):
    m['carpark_area'].append(dict(token=token(key, 'carpark_area', i),
                                  polygon_token=poly_of[('carpark', r)], orientation=0.0))
  for i, r in enumerate(town.rects['lane']):
    m['lane'].append(dict(token=token(key, 'lane', i), polygon_token=polygon(r, f'lane/{i}'),
                          lane_type='CAR', from_edge_line_token=None, to_edge_line_token=None,
                          left_lane_divider_segments=[], right_lane_divider_segments=[]))
  crossings = []
  for i, r in enumerate(town.rects['ped_crossing']):
    tok = token(key, 'ped_crossing', i)
    crossings.append(tok)
    m['ped_crossing'].append(dict(token=tok, polygon_token=polygon(r, f'ped/{i}'),
                                  road_segment_token=None))
  for i, r in enumerate(town.rects['walkway']):
    m['walkway'].append(dict(token=token(key, 'walkway', i), polygon_token=polygon(r, f'walk/{i}')))
  for i, r in enumerate(town.rects['stop_line']):
    m['stop_line'].append(dict(token=token(key, 'stop_line', i), polygon_token=polygon(r, f'stop/{i}'),
                               stop_line_type='PED_CROSSING', ped_crossing_tokens=[crossings[i]],
                               traffic_light_tokens=[], road_block_token=None))
  for layer in ('road_divider', 'lane_divider'):
    for i, seg in enumerate(town.lines[layer]):
      m[layer].append(dict(token=token(key, layer, i), line_token=line(seg, f'{layer}/{i}'),
                           road_segment_token=None))
  return m


def write_map_json(path: str, data: dict) -> None:
  text = json.dumps(data, separators=(',', ':'))  # the C encoder; json.dump is pure Python
  with open(path, 'w') as f:
    f.write(text)


def write_map_png(path: str, town: Town) -> None:
  """Drivable-surface mask at 0.1 m/px, origin bottom-left at map (0, 0) (like nuScenes maps).
  8-bit 0/255 like the real maps; zlib's run-length strategy suits a binary mask (4x smaller
  and faster than the default)."""
  raised = np.zeros(town.material.shape, bool)
  for m in np.flatnonzero(rig.MATERIAL_RAISED):  # uint8 compares: no int64 index pass
    raised |= town.material == m
  road = np.where(raised[::-1], np.uint8(0), np.uint8(255))
  Image.fromarray(road).save(path, optimize=False, compress_level=1, compress_type=zlib.Z_RLE)
