"""The training loop's guarantees, on a toy task: parallel equivalence, multi-host, exact resume
after kill -9 (taking over the dead run's lock), SIGTERM checkpointing, the non-finite-loss guard,
a prompt exit. Damaged checkpoints, a full disk, repeated SIGTERMs and concurrent runs:
test_train_faults.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from helpers import tiny_config
from toy_task import toy_task

from nsmae_jax.data.fake import FakeIterator
from nsmae_jax.train import NonFiniteLossError, train_and_evaluate
from nsmae_jax.train.checkpointing import Checkpointer

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_TOY = os.path.join(HERE, 'run_toy.py')


def _run(workdir, steps, *extra, check=True, timeout=240):
  proc = subprocess.run([sys.executable, RUN_TOY, str(workdir), str(steps), *map(str, extra)],
                        capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(HERE))
  if check and proc.returncode:
    raise AssertionError(f'run_toy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc


def _result(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_two_devices_follow_one_device_at_the_same_global_batch(tmp_path):
  one = _run(tmp_path / 'one', 6, '--devices', 1, '--per_device', 2)
  two = _run(tmp_path / 'two', 6, '--devices', 2, '--per_device', 1)
  l1, l2 = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(l1) == sorted(l2) == list(range(1, 7))
  np.testing.assert_allclose([l1[s] for s in sorted(l1)], [l2[s] for s in sorted(l2)],
                             rtol=1e-5)
  np.testing.assert_allclose(_result(one)['fingerprint'], _result(two)['fingerprint'], rtol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_two_processes_end_with_identical_params(tmp_path):
  port = _free_port()
  args = ['--num_processes', 2, '--port', port]
  procs = [subprocess.Popen([sys.executable, RUN_TOY, str(tmp_path / 'w'), '5', *map(str, args),
                             '--process_id', str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
           for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f'{out}\n{err}'
  r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
  assert {r0['process'], r1['process']} == {0, 1}
  assert r0['step'] == r1['step'] == 5
  assert r0['fingerprint'] == r1['fingerprint']
  assert Checkpointer(str(tmp_path / 'w')).latest_step() == 5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_then_same_command_resumes_exactly(tmp_path):
  reference = tmp_path / 'reference'
  _run(reference, 8)
  killed = tmp_path / 'killed'
  proc = _run(killed, 8, '--kill_at', 5, check=False)
  assert proc.returncode == -9, proc.stderr
  assert Checkpointer(str(killed)).latest_step() == 3  # checkpoints every 3 steps
  with open(killed / 'run.lock') as f:  # kill -9 left its lock behind: a dead pid, this host
    lock = json.load(f)
  assert lock['host'] == socket.gethostname()
  with pytest.raises(ProcessLookupError):
    os.kill(lock['pid'], 0)
  resumed = _run(killed, 8)
  assert 'Resuming from checkpoint at step 3' in resumed.stdout
  assert 'taking over the stale lock' in resumed.stderr
  assert not (killed / 'run.lock').exists()  # released at the end
  ref, got = _losses(reference), _losses(killed)
  assert sorted(got) == list(range(1, 9))  # no step lost, none duplicated
  for step in range(4, 9):
    assert got[step] == pytest.approx(ref[step], rel=1e-6), step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_at_the_stopping_step(tmp_path):
  proc = _run(tmp_path / 'w', 20, '--term_at', 4)
  result = _result(proc)
  assert result['metrics']['preempted_at_step'] == 5  # the signal lands while fetching batch 5
  assert Checkpointer(str(tmp_path / 'w')).latest_step() == 5
  assert 'SIGTERM: saved checkpoint at step 5' in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_process_exits_within_5_s_of_its_last_checkpoint(tmp_path):
  """Pending saves, writers and iterators are finished inside the loop: nothing is left for
  interpreter teardown to wait on (orbax or tensorboardX threads, open iterators)."""
  proc = subprocess.Popen([sys.executable, RUN_TOY, str(tmp_path / 'w'), '6'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(HERE))
  out, err = proc.communicate(timeout=240)
  exited = time.time()
  assert proc.returncode == 0, f'{out}\n{err}'
  manifest = tmp_path / 'w' / 'checkpoints' / '6' / 'manifest.json'  # the last thing saved
  assert exited - manifest.stat().st_mtime < 5.0


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_returns_host_state_and_leaves_no_threads_or_lock(tmp_path):
  config = tiny_config(str(tmp_path), num_train_steps=3, log_every_steps=1,
                       checkpoint_every_steps=2, eval_every_steps=0, image_every_steps=0)
  before = {t.ident for t in threading.enumerate()}
  iterator = FakeIterator(config, 2)
  state, metrics = train_and_evaluate(config, config.train.workdir, toy_task(),
                                      train_iterator=iterator,
                                      eval_batches_fn=lambda: iter([next(FakeIterator(config, 2))]))
  assert int(state.step) == 3 and iterator.index == 3
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(state.params))
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['eval_loss'])
  left = [t.name for t in threading.enumerate() if t.ident not in before and not t.daemon]
  assert left == []
  assert Checkpointer(config.train.workdir).all_steps() == [2, 3]
  assert not os.path.exists(os.path.join(config.train.workdir, 'run.lock'))


class _Closing(FakeIterator):
  """A FakeIterator that records close(), standing in for the pipeline's iterators."""

  def __init__(self, *a, log, name, batches=None, **kw):
    super().__init__(*a, **kw)
    self.log, self.name, self.batches = log, name, batches

  def __next__(self):
    if self.batches is not None and self.index >= self.batches:
      raise StopIteration
    return super().__next__()

  def close(self):
    self.log.append(self.name)


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_closes_the_pipeline_iterators_it_created(tmp_path, monkeypatch):
  from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(tmp_path), num_train_steps=2, eval_every_steps=1,
                       checkpoint_every_steps=2, image_every_steps=0)
  closed = []
  monkeypatch.setattr(pipeline, 'make_train_iterator',
                      lambda cfg, **kw: _Closing(cfg, 2, log=closed, name='train'))
  monkeypatch.setattr(pipeline, 'make_eval_iterator',
                      lambda cfg, **kw: _Closing(cfg, 2, log=closed, name='eval', batches=1))
  train_and_evaluate(config, config.train.workdir, toy_task())
  assert closed == ['eval'] * 3 + ['train']  # evals at steps 0, 1, 2; train at the end
  given = _Closing(config, 2, log=closed, name='given')
  config = config.replace(num_train_steps=3)
  train_and_evaluate(config, config.train.workdir, toy_task(), train_iterator=given)
  assert 'given' not in closed  # the caller's iterator is the caller's to close


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_non_finite_loss_stops_and_names_the_step(tmp_path):
  config = tiny_config(str(tmp_path), num_train_steps=6, log_every_steps=2,
                       checkpoint_every_steps=2, eval_every_steps=0, image_every_steps=0)
  # The toy loss turns NaN once the warmup (lr 0 at step 1) lets the params move: at step 3.
  with pytest.raises(NonFiniteLossError, match=r'between steps 3 and 4.*\(step 2\) is kept'):
    train_and_evaluate(config, config.train.workdir, toy_task(nan_after_step=0),
                       train_iterator=FakeIterator(config, 2))
  assert Checkpointer(config.train.workdir).latest_step() == 2  # the bad state was not saved


@pytest.mark.timeout(300)  # pmap over 2 emulated devices
def test_eval_step_sums_array_metrics_per_element_and_skips_padding():
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train.steps import eval_step  # pylint: disable=import-outside-toplevel

  def loss_fn(params, batch, rng, train):
    del params, rng, train
    x = batch['x'][0]  # [3]
    return jnp.sum(x), {'metrics': {'counts': x, 'first': x[0]}}

  x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # [devices, B, 3]
  valid = np.array([[True, True], [True, False]])  # the last example is padding
  out = jax.pmap(functools.partial(eval_step, loss_fn=loss_fn), axis_name='batch')(
      np.zeros(2), {'x': x, 'valid': valid}, jax.random.split(jax.random.PRNGKey(0), 2))
  out = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), out)
  kept = x.reshape(4, 3)[:3]
  np.testing.assert_allclose(out['counts'], kept.sum(0))
  assert out['first'] == pytest.approx(kept[:, 0].sum())
  assert out['count'] == 3
