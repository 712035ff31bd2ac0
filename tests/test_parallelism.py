"""--parallelism=pmap and --parallelism=jit (jit + shard_map over a Mesh) train the same numbers,
resume each other's checkpoints, and agree across two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import tiny_config
from toy_task import toy_task

from nsmae_jax.data.fake import FakeIterator
from nsmae_jax.train import train_and_evaluate
from nsmae_jax.train import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_TOY = os.path.join(HERE, 'run_toy.py')


def _train(workdir, parallelism, steps, iterator_fn, eval_batch, **overrides):
  """train_and_evaluate on the toy task; returns ({step: [loss, grad_norm]}, final state, final
  metrics). grad_norm tells a step that averages gradients from one that sums them (Adam's
  update, and so the loss, barely changes when gradients double)."""
  config = tiny_config(num_train_steps=steps, parallelism=parallelism, log_every_steps=1,
                       image_every_steps=0, warmup_steps=2, **overrides)
  losses = {}

  def on_log(step, metrics):
    if 'loss' in metrics:
      losses[step] = [metrics['loss'], metrics['grad_norm']]

  state, metrics = train_and_evaluate(config, str(workdir), toy_task(),
                                      train_iterator=iterator_fn(config),
                                      eval_batches_fn=lambda: iter([eval_batch(config)]),
                                      on_log=on_log)
  return losses, state, metrics


def _assert_same(a, b):
  (la, sa, ma), (lb, sb, mb) = a, b
  assert sorted(la) == sorted(lb)
  np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)], rtol=1e-5)
  assert int(sa.step) == int(sb.step)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                         sa.params, sb.params)
  np.testing.assert_allclose(ma['eval_loss'], mb['eval_loss'], rtol=1e-5)


def test_jit_places_the_host_batch_as_pmap_does():
  """Local device i holds the rows pmap gives it; replicated leaves come back unchanged."""
  parallel = sharding.Jit(loss_fn=None)
  host = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [devices, B, ...]
  global_batch = parallel.batch({'x': host})['x']
  assert global_batch.shape == (6, 4)
  by_device = {s.device: np.asarray(s.data) for s in global_batch.addressable_shards}
  for i, device in enumerate(jax.local_devices()):
    np.testing.assert_array_equal(by_device[device], host[i])
  tree = {'w': np.ones((3, 2), np.float32), 'step': np.int32(7)}
  back = parallel.to_host(parallel.replicate(tree))
  np.testing.assert_array_equal(back['w'], tree['w'])
  assert int(back['step']) == 7


class _StopAfterStep2(FakeIterator):
  """Sends this process SIGTERM as batch 2 is taken: the loop saves step 2 and returns (a run of
  the same schedule cut short, unlike a run with num_train_steps=2)."""

  def __init__(self, config):
    super().__init__(config, 2)

  def __next__(self):
    if self.index == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


@pytest.mark.slow  # trains on 2 emulated devices (fast tier: < 2 min)
@pytest.mark.timeout(300)  # 2 emulated devices; a few compiles of the toy step
def test_pmap_and_jit_train_the_same_and_resume_each_others_checkpoints(tmp_path):
  assert jax.local_device_count() == 2
  iterator_fn = lambda config: FakeIterator(config, 2)  # noqa: E731
  eval_batch = lambda config: next(FakeIterator(config, 2, seed=9))  # noqa: E731
  kw = dict(checkpoint_every_steps=2, eval_every_steps=2)
  straight = _train(tmp_path / 'pmap', 'pmap', 4, iterator_fn, eval_batch, **kw)
  # jit for steps 1-2, then pmap from jit's checkpoint; and the other way round.
  for first, second in (('jit', 'pmap'), ('pmap', 'jit')):
    workdir = tmp_path / f'{first}_then_{second}'
    head, _, metrics = _train(workdir, first, 4, _StopAfterStep2, eval_batch, **kw)
    assert metrics['preempted_at_step'] == 2
    tail, state, metrics = _train(workdir, second, 4, iterator_fn, eval_batch, **kw)
    _assert_same(straight, ({**head, **tail}, state, metrics))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _TwoProcessesInOne(FakeIterator):
  """The global batch of run_toy's two processes (1 device each, seeds 0 and 1), on the two
  local devices of this process."""

  def __init__(self, config):
    super().__init__(config, 1)
    self.parts = [FakeIterator(config, 1, seed=s) for s in (0, 1)]

  def __next__(self):
    batches = [next(p) for p in self.parts]
    self.index += 1
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.timeout(300)
def test_jit_across_two_processes_matches_pmap_on_two_local_devices(tmp_path):
  port = _free_port()
  args = ['--num_processes', 2, '--port', port, '--parallelism', 'jit']
  procs = [subprocess.Popen([sys.executable, RUN_TOY, str(tmp_path / 'w'), '5', *map(str, args),
                             '--process_id', str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
           for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f'{out}\n{err}'
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  assert results[0]['fingerprint'] == results[1]['fingerprint']
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  two_process_losses = {r['step']: [r['loss'], r['grad_norm']] for r in rows if 'loss' in r}

  # run_toy's settings, in this process with pmap over its 2 devices.
  eval_batch = lambda config: {  # noqa: E731  each process evaluates seed 9's batch
      k: np.concatenate([v, v]) for k, v in next(FakeIterator(config, 1, seed=9)).items()}
  losses, state, metrics = _train(tmp_path / 'local', 'pmap', 5, _TwoProcessesInOne, eval_batch,
                                  checkpoint_every_steps=3, eval_every_steps=0)
  assert sorted(two_process_losses) == sorted(losses) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([two_process_losses[s] for s in range(1, 6)],
                             [losses[s] for s in range(1, 6)], rtol=1e-5)
  fingerprint = [float(np.sum(np.abs(x))) for x in jax.tree_util.tree_leaves(state.params)]
  np.testing.assert_allclose(results[0]['fingerprint'], fingerprint, rtol=1e-5)
  np.testing.assert_allclose(results[0]['metrics']['eval_loss'], metrics['eval_loss'], rtol=1e-5)
