"""Faults the training loop survives with nothing lost (issue 12): a damaged latest checkpoint
(truncated file, flipped byte), a full disk during a save, SIGTERM twice or during a save, and two
runs started on one work dir (the lock file; a stale one is taken over)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import tiny_config
from toy_task import toy_task

from nsmae_jax.data.fake import FakeIterator
from nsmae_jax.train import train_and_evaluate
from nsmae_jax.train.checkpointing import (CheckpointDamagedError, CheckpointError,
                                           Checkpointer, read_raw, resolve_step)
from nsmae_jax.train.integrity import verify_step
from nsmae_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_TOY = os.path.join(HERE, 'run_toy.py')


# ---- helpers -------------------------------------------------------------------------------


def _config(workdir, steps):
  return tiny_config(num_train_steps=steps, log_every_steps=1, checkpoint_every_steps=2,
                     eval_every_steps=0, image_every_steps=0, workdir=str(workdir))


def _train(workdir, steps):
  """The toy task in this process; FakeIterator restores its position from the checkpoint."""
  config = _config(workdir, steps)
  return train_and_evaluate(config, str(workdir), toy_task(),
                            train_iterator=FakeIterator(config, 2),
                            eval_batches_fn=lambda: iter([]))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  steps = [r['step'] for r in rows if 'loss' in r]
  assert len(steps) == len(set(steps)), f'a step was logged twice: {steps}'
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _run(workdir, steps, *extra, timeout=240):
  return subprocess.run([sys.executable, RUN_TOY, str(workdir), str(steps), *map(str, extra)],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=os.path.dirname(HERE))


def _ok(proc):
  assert proc.returncode == 0, f'run_toy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}'
  return proc


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Losses of an uninterrupted 8-step run (checkpoints at 2, 4, 6, 8)."""
  workdir = tmp_path_factory.mktemp('reference')
  _train(workdir, 8)
  return _losses(workdir)


# ---- damaged checkpoints ---------------------------------------------------------------------


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
@pytest.mark.parametrize('damage', [_truncate, _flip_byte], ids=['truncated', 'flipped_byte'])
def test_damaged_latest_checkpoint_is_named_and_run_resumes_from_previous(
    tmp_path, reference, damage, capsys):
  workdir = tmp_path / 'w'
  _train(workdir, 8)  # checkpoints 4, 6, 8 kept (max_to_keep 3)
  step8 = workdir / 'checkpoints' / '8'
  damage(_largest_file(step8 / 'state'))
  assert verify_step(str(step8)) is not None
  capsys.readouterr()
  state, _ = _train(workdir, 8)  # the same command again
  out = capsys.readouterr()
  assert f'checkpoint step 8 under {workdir}/checkpoints is damaged' in out.err
  assert 'Resuming from checkpoint at step 6' in out.out
  assert int(state.step) == 8
  # The bad step was moved aside (kept for inspection), not reused and not deleted.
  assert [d.split('-')[0] for d in os.listdir(workdir / 'checkpoints_damaged')] == ['8']
  assert verify_step(str(step8)) is None  # saved again, good
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 9))  # no step lost, none duplicated
  for step in (7, 8):  # retrained from step 6's state and data position
    assert got[step] == pytest.approx(reference[step], rel=1e-6), step


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_a_step_without_manifest_counts_as_incomplete(tmp_path, capsys):
  """A save renamed into place just before a kill -9 has no manifest yet: not trusted."""
  workdir = tmp_path / 'w'
  _train(workdir, 4)
  os.remove(workdir / 'checkpoints' / '4' / 'manifest.json')
  capsys.readouterr()
  _train(workdir, 4)
  out = capsys.readouterr()
  assert 'checkpoint step 4' in out.err and 'no manifest.json' in out.err
  assert 'Resuming from checkpoint at step 2' in out.out


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_refuses_naming_the_directory_when_every_checkpoint_is_damaged(tmp_path):
  workdir = tmp_path / 'w'
  _train(workdir, 4)
  for step in (2, 4):
    _flip_byte(_largest_file(workdir / 'checkpoints' / str(step) / 'state'))
  ckdir = f'{workdir}/checkpoints'
  with pytest.raises(CheckpointDamagedError, match=f'no usable checkpoint left under '
                     f'{re.escape(ckdir)}: ' r'step 4: .*sha256.*step 2: .*sha256'):
    _train(workdir, 6)
  assert not os.path.exists(workdir / 'run.lock')  # released on the way out
  assert sorted(d.split('-')[0] for d in os.listdir(workdir / 'checkpoints_damaged')) == ['2', '4']


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_readers_skip_a_damaged_latest_step_with_a_warning(tmp_path, capsys):
  workdir = tmp_path / 'w'
  _train(workdir, 4)
  _truncate(_largest_file(workdir / 'checkpoints' / '4' / 'state'))
  capsys.readouterr()
  assert resolve_step(str(workdir / 'checkpoints'), None) == 2
  assert 'skipping damaged checkpoint step 4' in capsys.readouterr().err
  with pytest.raises(CheckpointDamagedError, match='step 4 .* is damaged: .*truncated'):
    resolve_step(str(workdir / 'checkpoints'), 4)
  raw, step = read_raw(str(workdir))  # what fine-tuning reads: the newest good step
  assert step == 2 and int(raw['step']) == 2
  _truncate(_largest_file(workdir / 'checkpoints' / '2' / 'state'))
  with pytest.raises(CheckpointDamagedError, match='no usable checkpoint under'):
    read_raw(str(workdir))  # never a silent restore of damaged bytes


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_a_good_checkpoint_of_another_model_is_refused_and_left_in_place(tmp_path):
  workdir = tmp_path / 'w'
  _train(workdir, 2)
  config = _config(workdir, 4)
  with pytest.raises(CheckpointError, match=f'step 2 under {re.escape(str(workdir))}/checkpoints '
                     'is intact .* does not fit this model'):
    train_and_evaluate(config, str(workdir), toy_task(width=32),
                       train_iterator=FakeIterator(config, 2))
  assert verify_step(str(workdir / 'checkpoints' / '2')) is None  # not moved, not damaged
  assert not (workdir / 'checkpoints_damaged').exists()


# ---- the work dir lock (in process) ----------------------------------------------------------


def _write_lock(path, **owner):
  with open(path, 'w') as f:
    json.dump(dict(started='earlier', argv=['x']) | owner, f)


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
  lock = tmp_path / 'run.lock'
  with open('/proc/sys/kernel/pid_max') as f:
    dead_pid = int(f.read())  # pids are below pid_max: no process has this one
  _write_lock(lock, pid=dead_pid, host=socket.gethostname())
  with WorkdirLock(str(tmp_path)):
    assert 'taking over the stale lock' in capsys.readouterr().err
    with open(lock) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert not lock.exists()
  _write_lock(lock, pid=os.getppid(), host=socket.gethostname())  # alive: the parent
  with pytest.raises(WorkdirLockedError, match=f'pid {os.getppid()} on host '
                     f'{socket.gethostname()}'):
    WorkdirLock(str(tmp_path)).acquire()
  _write_lock(lock, pid=dead_pid, host='elsewhere')  # cannot be checked from here
  with pytest.raises(WorkdirLockedError, match='on host elsewhere'):
    WorkdirLock(str(tmp_path)).acquire()
  assert lock.exists()  # a refused run leaves the owner's lock alone


# ---- subprocess faults -----------------------------------------------------------------------


@pytest.fixture(scope='module')
def toy_reference(tmp_path_factory):
  """Losses of an uninterrupted 9-step run_toy (checkpoints every 3 steps), width 2048."""
  workdir = tmp_path_factory.mktemp('toy_reference') / 'w'
  _ok(_run(workdir, 9, '--width', 2048))
  return _losses(workdir)


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs: a file system that really fills up."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16M', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs to emulate a full disk: {proc.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_full_during_a_save_names_the_directory_and_rerun_resumes(small_disk,
                                                                       toy_reference):
  workdir = small_disk / 'w'
  _ok(_run(workdir, 3, '--width', 2048))  # checkpoint 3
  step3 = workdir / 'checkpoints' / '3'
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step3) for f in fs)
  assert size > 2**20  # a checkpoint of a few MB: logs fit in what is left, it does not
  filler = small_disk / 'filler'
  with open(filler, 'wb') as f:
    f.write(b'\0' * (shutil.disk_usage(small_disk).free - size // 2))

  full = _run(workdir, 9, '--width', 2048)
  assert full.returncode != 0
  assert (f'writing checkpoint step 6 under {workdir}/checkpoints failed: the disk is full'
          in full.stderr), full.stderr[-3000:]
  assert verify_step(str(step3)) is None  # the previous checkpoint is intact
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']  # the partial save is gone

  os.remove(filler)  # free space, run the same command again
  resumed = _ok(_run(workdir, 9, '--width', 2048))
  assert 'Resuming from checkpoint at step 3' in resumed.stdout
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 10))
  for step in range(1, 10):
    assert got[step] == pytest.approx(toy_reference[step], rel=1e-6), step


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('how', [('--term_at', 4, '--term_count', 2), ('--term_in_save', 3)],
                         ids=['twice', 'during_save'])
def test_repeated_sigterm_or_sigterm_during_save_leaves_one_good_checkpoint(tmp_path, how,
                                                                            toy_reference):
  workdir = tmp_path / 'w'
  proc = _ok(_run(workdir, 9, '--width', 2048, *how))  # a clean exit, status 0
  stop = 5 if how[0] == '--term_at' else 3  # batch 5 was being fetched / step 3 being saved
  assert f'SIGTERM: saved checkpoint at step {stop}; exiting' in proc.stdout
  assert 'SIGTERM again' in proc.stderr
  assert 'Traceback' not in proc.stderr
  ckpt = Checkpointer(str(workdir))
  assert ckpt.latest_step() == stop
  ckpt.close()
  assert verify_step(str(workdir / 'checkpoints' / str(stop))) is None
  assert not [d for d in os.listdir(workdir / 'checkpoints') if not d.isdigit()]  # no tmp dirs
  resumed = _ok(_run(workdir, 9, '--width', 2048))
  assert f'Resuming from checkpoint at step {stop}' in resumed.stdout
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 10))
  for step in range(1, 10):
    assert got[step] == pytest.approx(toy_reference[step], rel=1e-6), step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_run_on_a_workdir_refuses_naming_the_first(tmp_path):
  workdir = tmp_path / 'w'
  first = subprocess.Popen([sys.executable, RUN_TOY, str(workdir), '200', '--batch_sleep', '0.2'],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=os.path.dirname(HERE))
  try:
    deadline = time.time() + 120
    while not (workdir / 'run.lock').exists() and time.time() < deadline:
      assert first.poll() is None, first.communicate()
      time.sleep(0.1)
    second = _run(workdir, 200)
    assert second.returncode != 0
    assert (f'is in use by another run: pid {first.pid} on host {socket.gethostname()}'
            in second.stderr), second.stderr[-3000:]
    assert first.poll() is None  # the first run was not disturbed
  finally:
    first.terminate()  # SIGTERM: it checkpoints and exits cleanly
    out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err[-3000:]
  assert 'SIGTERM: saved checkpoint' in out
  assert not (workdir / 'run.lock').exists()
