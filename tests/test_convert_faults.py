"""Faults the converter survives with nothing lost: kill -9 in either stage, a full disk.

The reference is `convert` with the defaults of the command line (DataConfig's: 64x176 images,
1 sweep, +-32 m at 0.5 m) on the tiny synthetic trainval world, in this process (TensorFlow is
imported once). A run of the command `convert_nuscenes --dataroot=D --version=v1.0-trainval
--out=O` killed with SIGKILL, then the same command again, must leave a dataset directory
byte-identical to the reference: shards, dataset_info, features and statistics. Those reruns
are also the done-when check that the command converts with its defaults (TFDS refused the
default config's name as a custom config named like a listed one).
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import tiny_config
from data_prep.nuscenes_nsmae import record_io
from nsmae_jax.config import DataConfig
from nsmae_jax.data import naming

pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 600


def _command(dataroot: str, out: str) -> list[str]:
  """The converter with its defaults (v1.0-trainval, 64x176, 1 sweep, +-32 m at 0.5 m)."""
  return [sys.executable, '-m', 'data_prep.convert_nuscenes', f'--dataroot={dataroot}',
          '--version=v1.0-trainval', f'--out={out}']


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL='2')


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=_TIMEOUT_S)


def _dataset(out: str) -> str:
  return naming.dataset_dir(out, DataConfig(data_dir=out))


def _records(out: str) -> str:
  return naming.record_dir(out, DataConfig(data_dir=out))


def _contents(directory: str) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), 'rb').read()
          for name in sorted(os.listdir(directory))}


def _kill_when(cmd: list[str], condition, log_path: str) -> bool:
  """Runs cmd and SIGKILLs its whole process group (workers too) as soon as condition() holds;
  False if it finished first."""
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log, start_new_session=True)
  deadline = time.time() + _TIMEOUT_S
  try:
    while proc.poll() is None and time.time() < deadline:
      if condition():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.002)  # stage 2 of the tiny world lasts ~0.1 s
    return False
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


@pytest.fixture(scope='module')
def reference(synthetic_dataroot, tmp_path_factory) -> str:
  """The dataset dir of an uninterrupted conversion with the converter's defaults."""
  from data_prep.convert_nuscenes import convert
  out = str(tmp_path_factory.mktemp('reference'))
  convert(DataConfig(data_dir=out, dataroot=synthetic_dataroot), workers=2, log=lambda _: None)
  return _dataset(out)


def test_defaults_convert_trainval(reference):
  """The default settings convert the trainval world (the builder accepts their config)."""
  import tensorflow_datasets as tfds
  assert reference.endswith(os.path.join('trainval_64x176_sw1_e32_r0p5', naming.VERSION))
  builder = tfds.builder_from_directory(reference)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'train': 8, 'val': 4}
  example = next(iter(tfds.as_numpy(builder.as_dataset(split='val'))))
  assert example['images'].shape == (6, 64, 176, 3)
  assert example['bev_map'].shape == (6, 128, 128)
  assert not os.path.exists(_records(os.path.dirname(os.path.dirname(
      os.path.dirname(reference)))))  # records deleted after the build


def test_kill_during_records_then_rerun(synthetic_dataroot, reference, tmp_path):
  out = str(tmp_path / 'out')
  cmd = _command(synthetic_dataroot, out)
  pattern = os.path.join(_records(out), '*', '*.npz')
  assert _kill_when(cmd, lambda: glob.glob(pattern), str(tmp_path / 'killed.log'))
  assert not os.path.exists(_dataset(out))
  finished = glob.glob(pattern)
  assert 1 <= len(finished) < 12
  for path in finished:  # the rename makes every record under its final name complete
    record_io.load_record(path)

  result = _run(cmd)  # the same command, with the converter's defaults
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{len(finished)} records of an earlier run found' in result.stdout
  assert f'{len(finished)} reused' in result.stdout
  assert _contents(_dataset(out)) == _contents(reference)


def test_kill_while_writing_shards_then_rerun(synthetic_dataroot, reference, tmp_path):
  out = str(tmp_path / 'out')
  cmd = _command(synthetic_dataroot, out)
  incomplete = os.path.join(os.path.dirname(_dataset(out)), 'incomplete.*', '*')
  for _ in range(3):  # the shard window of the tiny world is short; retry if it was missed
    if _kill_when(cmd, lambda: glob.glob(incomplete), str(tmp_path / 'killed.log')):
      break
    shutil.rmtree(out)
  else:
    pytest.fail('the converter finished before any shard file appeared, three times')
  assert not os.path.exists(_dataset(out))
  assert glob.glob(incomplete)  # TFDS' temporary directory, left behind by the kill
  assert len(glob.glob(os.path.join(_records(out), '*', '*.npz'))) == 12

  result = _run(cmd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'removed 1 leftovers of an interrupted run' in result.stdout
  assert 'records: 0 made, 12 reused' in result.stdout
  assert not glob.glob(os.path.join(os.path.dirname(_dataset(out)), 'incomplete.*'))
  assert _contents(_dataset(out)) == _contents(reference)


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs: a real file system that runs out of space."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(mount)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs to emulate a full disk: {result.stderr.strip()}')
  try:
    yield str(mount)
  finally:
    subprocess.run(['umount', str(mount)], check=False)


def _fill(mount: str, leave: int) -> str:
  """Writes a filler file so that about `leave` bytes stay free; returns its path."""
  st = os.statvfs(mount)
  path = os.path.join(mount, 'filler')
  with open(path, 'wb') as f:
    f.truncate(0)
    f.write(b'\0' * max(st.f_bavail * st.f_frsize - leave, 0))
  return path


def _record_size(dataroot: str, config) -> int:
  """Bytes of one record file of config (one val key frame made in this process)."""
  import tempfile
  from nuscenes.map_expansion.map_api import NuScenesMap
  from nuscenes.nuscenes import NuScenes
  from data_prep.nuscenes_nsmae import record as record_lib
  nusc = NuScenes(version='v1.0-trainval', dataroot=dataroot, verbose=False)
  settings = record_lib.RecordSettings(config.image_height, config.image_width,
                                       config.num_sweeps, config.bev_half_extent,
                                       config.bev_resolution)
  sample = nusc.sample[-1]
  nusc_map = NuScenesMap(dataroot=dataroot, map_name=nusc.log[0]['location'])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'r.npz')
    record_io.save_record(path, record_lib.make_record(nusc, nusc_map, sample['token'],
                                                       settings))
    return os.path.getsize(path)


def test_disk_full_while_writing_records(synthetic_dataroot, small_disk):
  from data_prep.convert_nuscenes import ConversionError, convert
  config = tiny_config(data_dir=os.path.join(small_disk, 'tfds'), dataroot=synthetic_dataroot,
                       bev_half_extent=8.0).data
  filler = _fill(small_disk, int(2.5 * _record_size(synthetic_dataroot, config)))
  records = os.path.join(naming.record_dir(config.data_dir, config), 'val')
  with pytest.raises(ConversionError) as info:
    convert(config, workers=1, splits=['val'], log=lambda _: None)
  assert records in str(info.value) and 'free space and rerun' in str(info.value)
  finished = os.listdir(records)
  assert 1 <= len(finished) < 4 and all(f.endswith('.npz') for f in finished)  # no temporaries
  for name in finished:
    record_io.load_record(os.path.join(records, name))

  os.remove(filler)
  messages = []
  convert(config, workers=1, splits=['val'], log=messages.append)
  assert any(m.startswith(f'records: {4 - len(finished)} made, {len(finished)} reused')
             for m in messages), messages
  assert os.path.isfile(os.path.join(naming.dataset_dir(config.data_dir, config),
                                     'dataset_info.json'))


def test_disk_full_while_writing_shards(synthetic_dataroot, small_disk):
  from data_prep.convert_nuscenes import ConversionError, convert
  config = tiny_config(data_dir=os.path.join(small_disk, 'tfds'), dataroot=synthetic_dataroot,
                       bev_half_extent=8.0).data
  filler = []

  def fill_after_records(message: str) -> None:  # stage 1 is done: the disk fills up now
    if message.startswith('records:'):
      filler.append(_fill(small_disk, 64 * 1024))

  with pytest.raises(ConversionError) as info:
    convert(config, workers=1, splits=['val'], log=fill_after_records)
  dataset_parent = os.path.dirname(naming.dataset_dir(config.data_dir, config))
  assert dataset_parent in str(info.value) and 'free space and rerun' in str(info.value)
  records = os.path.join(naming.record_dir(config.data_dir, config), 'val')
  assert len(os.listdir(records)) == 4
  for name in os.listdir(records):
    record_io.load_record(os.path.join(records, name))
  assert not os.path.exists(naming.dataset_dir(config.data_dir, config))

  os.remove(filler[0])
  messages = []
  convert(config, workers=1, splits=['val'], log=messages.append)
  assert any(m.startswith('records: 0 made, 4 reused') for m in messages), messages
  assert os.path.isfile(os.path.join(naming.dataset_dir(config.data_dir, config),
                                     'dataset_info.json'))
