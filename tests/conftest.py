"""Shared fixtures: the synthetic world and its converted dataset are built once per test run.

Slow, end-to-end tests carry `@pytest.mark.e2e`; `pytest -m "not e2e"` runs the fast unit tests.
"""

from __future__ import annotations

import os
import sys

# Tests see two CPU devices so that pmap paths are exercised; set before jax is imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

from nsmae_jax.config import Config  # noqa: E402

# The tiny world every data test shares (3 scenes: 2 train + 1 val).
WORLD = dict(num_scenes=3, val_scenes=1, frames_per_scene=4, sweeps_per_frame=2,
             image_width=400, image_height=225, seed=0)


def tiny_config(tmp_dir: str = '', **overrides) -> Config:
  """The CPU test configuration (small images, few points, few rays)."""
  base = dict(image_height=32, image_width=88, patch_size=8, max_points=4096, max_boxes=32,
              bev_half_extent=32.0, bev_resolution=0.5, pillar_size=1.0, volume_stride=2,
              volume_z_cells=4, num_samples=16, perspective_rays=128, bev_rays=64,
              field_width=32, num_train_steps=4, per_device_batch_size=1, warmup_steps=1,
              log_every_steps=1, checkpoint_every_steps=2, eval_every_steps=0,
              image_every_steps=2, eval_batches=1, num_sweeps=2)
  if tmp_dir:
    base['workdir'] = os.path.join(tmp_dir, 'workdir')
  base.update(overrides)
  return Config().replace(**base)


@pytest.fixture(scope='session')
def synthetic_dataroot(tmp_path_factory) -> str:
  """A nuScenes-format dataroot of the tiny synthetic world (version v1.0-trainval)."""
  from data_prep.make_synthetic import generate  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp('world') / 'nuscenes')
  return generate(out, **WORLD)


@pytest.fixture(scope='session')
def converted_data_dir(synthetic_dataroot, tmp_path_factory) -> str:
  """TFDS data dir holding `nuscenes_nsmae` converted from the tiny world at tiny_config()."""
  from data_prep.convert_nuscenes import convert  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp('tfds'))
  config = tiny_config(data_dir=out, dataroot=synthetic_dataroot)
  convert(config.data, workers=1)
  return out


# A tf.data iterator over from_generator can deadlock while it is being closed at interpreter
# exit (its prefetch thread waits for the GIL the closing thread holds). Seen twice after the
# last test had passed, once during teardown and once in the pipeline's atexit close, so the
# test process never exited. Once pytest has reported, end the process with its exit status.
def pytest_sessionfinish(session, exitstatus):
  session.config.nsmae_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  status = getattr(config, 'nsmae_exitstatus', None)
  if status is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
