"""Shared fixtures: the synthetic world and its converted dataset are built once per test run.

Two tiers: `pytest -m "not slow"` runs the fast tests (no world generation, no subprocesses;
add `-n 2` for two pytest-xdist workers); `pytest` runs everything. A test that uses the world fixtures is marked slow here
automatically; tests that start processes or train on real data carry `@pytest.mark.slow`.
Helpers (tiny_config, WORLD) live in tests/helpers.py.
"""

from __future__ import annotations

import os

# Tests see two CPU devices so that pmap paths are exercised; set before jax is imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache per test run (JAX reads these variables at import): the
# subprocesses of the slow tests (run_toy, entry points) then load the programs an earlier one
# compiled. Fresh per run so that no stale program outlives a code change.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _XLA_CACHE = tempfile.mkdtemp(prefix='nsmae_test_xla_')
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import pytest  # noqa: E402

from helpers import WORLD, tiny_config  # noqa: E402  pylint: disable=unused-import


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


_WORLD_FIXTURES = {'synthetic_dataroot', 'converted_data_dir'}


def pytest_collection_modifyitems(items):
  """Tests that need the generated world are slow, whether or not they say so."""
  for item in items:
    if _WORLD_FIXTURES & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_processes(request, monkeypatch):
  """A test not marked slow that starts a process fails, naming the rule: the fast tier
  (`-m "not slow"`) runs no subprocesses (nor worker pools)."""
  if request.node.get_closest_marker('slow'):
    return
  import multiprocessing.context  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  def refuse(*args, **kwargs):
    del args, kwargs
    raise RuntimeError(f'{request.node.nodeid} starts a process: mark it @pytest.mark.slow '
                       '(the fast tier runs no subprocesses)')

  monkeypatch.setattr(subprocess.Popen, '__init__', refuse)
  monkeypatch.setattr(multiprocessing.context.BaseContext, 'Pool', refuse)
  monkeypatch.setattr(multiprocessing.process.BaseProcess, 'start', refuse)
