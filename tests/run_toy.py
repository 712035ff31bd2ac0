"""Runs the training loop on the toy task in its own process (multi-device/multi-host tests).

  python tests/run_toy.py WORKDIR STEPS [--devices N] [--kill_at K] [--term_at K [--term_count C]]
      [--term_in_save S] [--width W] [--batch_sleep T]
      [--process_id I --num_processes N --port P] [--parallelism pmap|jit]

Prints one JSON line: the final metrics and a fingerprint of the final params.
"""

import argparse
import json
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument('workdir')
parser.add_argument('steps', type=int)
parser.add_argument('--devices', type=int, default=1)
parser.add_argument('--per_device', type=int, default=1)
parser.add_argument('--kill_at', type=int, default=-1)
parser.add_argument('--term_at', type=int, default=-1)
parser.add_argument('--term_count', type=int, default=1, help='SIGTERMs sent at --term_at')
parser.add_argument('--term_in_save', type=int, default=-1,
                    help='send two SIGTERMs while the save of this step is being written')
parser.add_argument('--width', type=int, default=16, help='hidden units of the toy model')
parser.add_argument('--batch_sleep', type=float, default=0.0, help='seconds per batch (slow run)')
parser.add_argument('--process_id', type=int, default=0)
parser.add_argument('--num_processes', type=int, default=1)
parser.add_argument('--port', type=int, default=0)
parser.add_argument('--parallelism', default='pmap', choices=('pmap', 'jit'))
args = parser.parse_args()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tiny_config  # noqa: E402
from toy_task import toy_task  # noqa: E402

from nsmae_jax.data.fake import FakeIterator  # noqa: E402
from nsmae_jax.train import train_and_evaluate  # noqa: E402


def _wait_for_checkpoint(workdir, step, timeout=120.0):
  """Waits until the save of `step` is complete: finalised and its manifest written."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'manifest.json')
  deadline = time.time() + timeout
  while not os.path.exists(path) and time.time() < deadline:
    time.sleep(0.05)


def _sigterm(count):
  """Sends `count` SIGTERMs to this process, each one handled before the next is sent.

  Signals are not queued: two kills in a row can reach the process (or CPython's handler) as one,
  so after each kill this waits until the installed handler (the loop's Preemption) counted it.
  """
  for _ in range(count):
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, '__self__', None)
    before = getattr(owner, 'signals', None)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 30.0
    while before is not None and owner.signals == before and time.time() < deadline:
      time.sleep(0.01)


class Interrupting(FakeIterator):
  """Delivers a signal to this process when batch `at` is requested (a deterministic 'kill')."""

  def __init__(self, *a, at=-1, sig=None, **kw):
    super().__init__(*a, **kw)
    self.at, self.sig = at, sig

  def __next__(self):
    if self.index == self.at:
      if self.sig == signal.SIGKILL:
        _wait_for_checkpoint(args.workdir, 3)
      if self.sig == signal.SIGTERM:
        _sigterm(args.term_count)
      else:
        os.kill(os.getpid(), self.sig)
    if args.batch_sleep:
      time.sleep(args.batch_sleep)
    return super().__next__()


if args.term_in_save >= 0:
  import orbax.checkpoint as ocp  # noqa: E402
  _orbax_save = ocp.CheckpointManager.save

  def _save_then_terminate(self, step, *a, **kw):
    """Two SIGTERMs while orbax writes `step` in the background (after its save() returns)."""
    saved = _orbax_save(self, step, *a, **kw)
    if step == args.term_in_save:
      _sigterm(2)
    return saved

  ocp.CheckpointManager.save = _save_then_terminate


overrides = dict(num_train_steps=args.steps, per_device_batch_size=args.per_device,
                 checkpoint_every_steps=3, log_every_steps=1, eval_every_steps=0,
                 image_every_steps=0, warmup_steps=2, parallelism=args.parallelism)
if args.num_processes > 1:
  overrides.update(coordinator_address=f'127.0.0.1:{args.port}',
                   num_processes=args.num_processes, process_id=args.process_id)
config = tiny_config(**overrides)
sig = signal.SIGKILL if args.kill_at >= 0 else signal.SIGTERM
at = args.kill_at if args.kill_at >= 0 else args.term_at
if args.num_processes > 1:
  from nsmae_jax.train import distributed  # noqa: E402
  distributed.maybe_initialize(config.train)
# Each process reads its own part of the global batch: a different seed per process.
iterator = Interrupting(config, jax.local_device_count(), seed=args.process_id, at=at, sig=sig)
eval_config = config
state, metrics = train_and_evaluate(
    config, args.workdir, task=toy_task(width=args.width), train_iterator=iterator,
    eval_batches_fn=lambda: iter([next(FakeIterator(eval_config, jax.local_device_count(), 9))]))
leaves = jax.tree_util.tree_leaves(state.params)
print(json.dumps({'metrics': metrics, 'step': int(state.step),
                  'fingerprint': [float(np.sum(np.abs(x))) for x in leaves],
                  'process': jax.process_index()}), flush=True)
