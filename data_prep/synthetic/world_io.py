"""Reconstructing a generated world from its dataroot, and rendering ground-truth depth.

The generator writes `<dataroot>/synthetic_world.json` (ignored by the devkit) with the settings;
the world itself is rebuilt from (seed, scene index), never stored.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from data_prep.synthetic import rig, sensors
from data_prep.synthetic.simulate import Settings, build_world, scene_time

WORLD_FILE = 'synthetic_world.json'


def write_world_file(out: str, settings: Settings, names: list) -> None:
  with open(os.path.join(out, WORLD_FILE), 'w') as f:
    json.dump(dict(settings=dataclasses.asdict(settings),
                   scenes={n: i for i, n in enumerate(names)}), f, indent=1, sort_keys=True)


def read_world_file(dataroot: str):
  """(Settings, {scene name: scene index}) of a generated dataroot."""
  path = os.path.join(dataroot, WORLD_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {dataroot} was not written by make_synthetic')
  with open(path) as f:
    data = json.load(f)
  return Settings(**data['settings']), data['scenes']


def camera_depth(nusc, sample_data_token: str) -> np.ndarray:
  """Ground-truth z-depth [H, W] float32 (metres, inf where sky) of a camera sample_data, rendered
  from the world description at that image's timestamp and pose."""
  sd = nusc.get('sample_data', sample_data_token)
  channel = nusc.get('sensor', nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])['sensor_token'])['channel']
  if channel not in rig.CAMERAS:
    raise ValueError(f'sample_data {sample_data_token} is {channel}, not a camera')
  settings, scenes = read_world_file(nusc.dataroot)
  scene = nusc.get('scene', nusc.get('sample', sd['sample_token'])['scene_token'])
  index = scenes[scene['name']]
  world = build_world(settings, index)
  t = scene_time(settings, index, sd['timestamp'])
  _, depth = sensors.camera_render(world, channel, t, sd['width'], sd['height'])
  return depth
