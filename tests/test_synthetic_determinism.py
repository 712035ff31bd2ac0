"""Synthetic world: determinism across seeds and workers, and clear errors on bad input."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from data_prep.make_synthetic import generate
from data_prep.synthetic import rig
from data_prep.synthetic.town import build_town

SMALL = dict(num_scenes=2, val_scenes=1, frames_per_scene=2, sweeps_per_frame=1, image_width=64,
             image_height=36)


def _digest(root: str) -> dict:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out


@pytest.mark.slow
def test_same_seed_byte_identical_regardless_of_workers(tmp_path):
  a = _digest(generate(str(tmp_path / 'a'), seed=3, workers=1, **SMALL))
  messages = []
  b = _digest(generate(str(tmp_path / 'b'), seed=3, workers=2, log=messages.append, **SMALL))
  assert a == b and len(a) > 30
  # The summary names the rate and the CPU time of every simulation stage.
  assert any('4 key frames' in m and 'key frames/s, 2 workers' in m for m in messages), messages
  timing = [m for m in messages if m.startswith('timing:')]
  assert len(timing) == 1 and all(k in timing[0] for k in ('camera', 'lidar', 'jpeg', 'annotations'))


def test_different_seed_different_town():
  a, b = build_town(0, 0), build_town(1, 0)
  assert a.material.shape != b.material.shape or not np.array_equal(a.material, b.material)
  assert not np.array_equal(a.xs, b.xs) or not np.array_equal(a.ys, b.ys)
  again = build_town(0, 0)
  assert np.array_equal(a.material, again.material) and np.array_equal(a.scenery.centre, again.scenery.centre)


def test_town_has_every_surface_and_map_layer():
  town = build_town(0, 0)
  present = set(np.unique(town.material))
  for name in ('asphalt', 'lane_marking', 'road_divider', 'zebra', 'stop_line', 'sidewalk', 'grass',
               'carpark'):
    assert rig.MATERIAL_ID[name] in present, name
  for layer in ('drivable_area', 'lane', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area'):
    assert town.rects[layer], layer
  assert town.lines['road_divider']


def test_non_empty_out_refused_unless_overwrite(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='--overwrite'):
    generate(str(out), **SMALL)
  # --overwrite only replaces a directory this tool wrote.
  with pytest.raises(FileExistsError, match='not written by make_synthetic'):
    generate(str(out), overwrite=True, **SMALL)
  assert (out / 'keep.txt').exists()


@pytest.mark.slow
def test_interrupted_generation_leaves_no_dataroot_and_a_rerun_completes(tmp_path, monkeypatch):
  import data_prep.make_synthetic as ms  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'world'
  real = ms.write_world_file

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # the run dies after every scene and table is written

  monkeypatch.setattr(ms, 'write_world_file', killed)
  with pytest.raises(KeyboardInterrupt):
    generate(str(out), **SMALL)
  assert not out.exists() and (tmp_path / 'world.incomplete').is_dir()
  monkeypatch.setattr(ms, 'write_world_file', real)
  generate(str(out), **SMALL)  # what ensure_dataset does next: starts the world afresh
  assert not (tmp_path / 'world.incomplete').exists()
  reference = generate(str(tmp_path / 'reference'), **SMALL)
  assert _digest(str(out)) == _digest(reference)


@pytest.mark.parametrize('kwargs, flag', [
    (dict(num_scenes=0), 'num_scenes'),
    (dict(num_scenes=2, val_scenes=2), 'val_scenes'),
    (dict(frames_per_scene=0), 'frames_per_scene'),
    (dict(sweeps_per_frame=-1), 'sweeps_per_frame'),
    (dict(image_width=8), 'image_width'),
    (dict(workers=0), 'workers'),
    (dict(seed=-1), 'seed'),
    (dict(version='trainval'), 'version'),
])
def test_invalid_values_name_the_flag(tmp_path, kwargs, flag):
  with pytest.raises(ValueError, match=f'invalid {flag}='):
    generate(str(tmp_path / 'x'), **kwargs)
  assert not (tmp_path / 'x').exists()
