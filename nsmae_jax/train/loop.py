"""train_and_evaluate: the data-parallel training loop shared by pre-training and fine-tuning.

Shaped like flax's examples/imagenet train.py: create or restore the state, then the loop, with
the periodic actions (log, images, eval, checkpoint, preemption) as small functions. One process
per host; each reads its own part of the data. The per-device step (steps.py) is pure; the
parallel wrapper (sharding.py: pmap, or jit over a Mesh, by --parallelism) is applied here, once.

What a run guarantees:
- A killed run resumes from its newest good checkpoint (train state and data iterator position
  saved together, verified by checksum; a damaged step is named and moved aside).
- SIGTERM (preemption), once or repeatedly, even during a save: one checkpoint at the current
  step, then a clean return.
- A non-finite loss stops the run naming the step range, without saving the bad state.
- A failed save (e.g. a full disk) stops the run with CheckpointWriteError naming the directory.
- One run per work dir (a lock file; a second run is refused, naming the holder).
- On return, saves are complete on disk, and the writers and the iterators the loop created are
  closed: the process can exit at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np
from absl import logging

from nsmae_jax.config import Config
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.train import distributed, sharding
from nsmae_jax.train.checkpointing import Checkpointer
from nsmae_jax.train.metric_writer import MetricWriter, Progress
from nsmae_jax.train.optim import learning_rate_schedule, make_optimizer
from nsmae_jax.train.preemption import Preemption
from nsmae_jax.train.steps import TrainState
from nsmae_jax.train.task import Task
from nsmae_jax.train.workdir_lock import WorkdirLock


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the message names the step range."""


class TrainResult(NamedTuple):
  """What train_and_evaluate returns (unpacks as `state, metrics = ...`).

  state: the final TrainState on the host (numpy leaves, unreplicated).
  metrics: the last logged train metrics, the last eval's metrics prefixed 'eval_', and
    'preempted_at_step' when SIGTERM stopped the run. Empty when there was nothing left to train.
  """
  state: TrainState
  metrics: dict[str, float]


def _numeric(batch: dict) -> dict:
  """Drops non-numeric entries (tokens, names) that cannot go to devices."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in 'biuf'}


def _host_scalars(parallel: sharding.Pmap | sharding.Jit, metrics: Any) -> dict[str, float]:
  metrics = parallel.to_host(metrics)
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def _close(iterator: Any) -> None:
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def _due(step: int, every: int) -> bool:
  return bool(every) and step % every == 0


def evaluate(task: Task, parallel: sharding.Pmap | sharding.Jit, rparams, rng,
             batches: Iterable[dict], max_batches: int) -> dict:
  """Runs parallel.eval over `batches` (at most max_batches, 0 = all); returns the task's summary.

  Each batch is a host batch [local_devices, B, ...] (optionally with `valid` [local_devices, B]
  marking padding); rparams and rng are replicated by `parallel`.
  """
  sums = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = parallel.to_host(parallel.eval(rparams, parallel.batch(_numeric(batch)), rng))
    sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
  if sums is None:
    return {}
  return task.eval_summary(sums)


def create_train_state(config: Config, task: Task, rng: jax.Array) -> TrainState:
  """Fresh params (from the task, on an example batch's shapes) and optimiser state."""
  example = fake_batch(config, config.train.per_device_batch_size)  # shapes only
  params = jax.jit(task.init_params)(rng, example)  # eager init compiles op by op
  return TrainState.create(apply_fn=None, params=params,
                           tx=make_optimizer(config.train, task.lr_scales))


def restore_or_initialize(ckpt: Checkpointer, state: TrainState, task: Task, train_iterator: Any,
                          log: Callable[[str], None]) -> tuple[TrainState, int]:
  """(state, first step - 1): the newest good checkpoint, else task.prepare_params(fresh)."""
  restored = ckpt.restore_latest(state)
  if restored is None:
    return state.replace(params=task.prepare_params(state.params)), 0
  state, data_state, step = restored
  if data_state and hasattr(train_iterator, 'set_state'):
    train_iterator.set_state(data_state)
  logging.info('resumed %s from step %d', ckpt.directory, step)
  log(f'Resuming from checkpoint at step {step} in {ckpt.directory}')
  return state, step


@dataclasses.dataclass
class _Run:
  """The pieces the periodic actions share (one run of train_and_evaluate)."""
  config: Config
  task: Task
  ckpt: Checkpointer
  writer: MetricWriter
  progress: Progress
  train_iterator: Any
  eval_batches_fn: Callable[[], Iterable[dict]]
  on_log: Callable[[int, dict], None] | None
  is_main: bool
  parallel: sharding.Pmap | sharding.Jit
  rstate: Any
  step_rng: Any
  eval_rng: Any
  image_rng: jax.Array
  last: dict = dataclasses.field(default_factory=dict)
  last_eval: dict = dataclasses.field(default_factory=dict)
  last_checked: int = 0
  t_log: float = 0.0
  s_log: int = 0

  def check_finite(self, step: int, metrics: dict) -> None:
    if not np.isfinite(metrics['loss']):
      raise NonFiniteLossError(
          f'non-finite loss ({metrics["loss"]}) between steps {self.last_checked + 1} and '
          f'{step}; the last good checkpoint in {self.ckpt.directory} (step '
          f'{self.ckpt.latest_step()}) is kept')
    self.last_checked = step

  def log(self, step: int, metrics: Any) -> None:
    """Train scalars (with rates and learning rate) to the writers, the bar and on_log."""
    tc = self.config.train
    last = _host_scalars(self.parallel, metrics)
    self.check_finite(step, last)
    now = time.time()
    last['steps_per_second'] = (step - self.s_log) / max(now - self.t_log, 1e-9)
    last['samples_per_second'] = (last['steps_per_second'] * tc.per_device_batch_size
                                  * jax.device_count())
    last['learning_rate'] = float(learning_rate_schedule(tc)(step - 1))
    self.t_log, self.s_log = now, step
    self.last = last
    self.writer.scalars(step, last)
    self.progress.train(step, last)
    if self.on_log is not None and self.is_main:
      self.on_log(step, dict(last))

  def images(self, step: int, batch: dict) -> None:
    """The task's images of the first device's batch (host batch [devices, B, ...] -> [B, ...]),
    drawn with process 0's params."""
    params0 = self.parallel.to_host(self.rstate.params)
    batch0 = {k: v[0] for k, v in batch.items()}
    self.writer.images(step, self.task.render_images(params0, batch0, self.image_rng))

  def evaluate(self, step: int) -> None:
    """One pass of eval_batches_fn() (closed afterwards); scalars prefixed 'eval_'."""
    batches = self.eval_batches_fn()
    try:
      self.last_eval = evaluate(self.task, self.parallel, self.rstate.params, self.eval_rng,
                                batches, self.config.train.eval_batches)
    finally:
      _close(batches)
    if self.last_eval:
      self.writer.scalars(step, self.last_eval, prefix='eval_')
      self.progress.eval(step, self.last_eval)
      if self.on_log is not None and self.is_main:
        self.on_log(step, {f'eval_{k}': v for k, v in self.last_eval.items()})

  def checkpoint(self, step: int, metrics: Any) -> None:
    """Saves (asynchronously) unless the loss went non-finite since the last check."""
    self.check_finite(step, _host_scalars(self.parallel, metrics))
    data_state = (self.train_iterator.get_state() if hasattr(self.train_iterator, 'get_state')
                  else None)
    self.ckpt.save(step, self.parallel.to_host(self.rstate), data_state, force=True)

  def train(self, start: int, preemption: Preemption) -> int | None:
    """Steps start+1 .. num_train_steps; returns the step SIGTERM stopped at, else None."""
    tc = self.config.train
    total = tc.num_train_steps
    self.t_log, self.s_log, self.last_checked = time.time(), start, start
    for step in range(start + 1, total + 1):
      batch = _numeric(next(self.train_iterator))
      self.rstate, metrics = self.parallel.train(self.rstate, self.parallel.batch(batch),
                                                 self.step_rng)
      self.progress.advance(step)
      self.ckpt.poll()  # the manifest of a save that finished meanwhile
      last = step == total
      if _due(step, tc.log_every_steps) or last:
        self.log(step, metrics)
      if (self.task.render_images is not None and self.is_main and tc.image_every_steps
          and (_due(step, tc.image_every_steps) or last)):
        self.images(step, batch)
      if _due(step, tc.eval_every_steps) and not preemption.requested:
        self.evaluate(step)
      if _due(step, tc.checkpoint_every_steps) or last or preemption.requested:
        self.checkpoint(step, metrics)
      if preemption.requested:
        self.ckpt.wait()
        self.progress.write(f'SIGTERM: saved checkpoint at step {step}; exiting')
        return step
    return None


def train_and_evaluate(config: Config, workdir: str, task: Task, *,
                       train_iterator: Any = None,
                       eval_batches_fn: Callable[[], Iterable[dict]] | None = None,
                       on_log: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Trains `task` for config.train.num_train_steps, evaluating and checkpointing in `workdir`.

  Resumes from the newest good checkpoint in `workdir/checkpoints` when there is one.

  Args:
    config: the run's Config.
    workdir: where checkpoints, metrics.jsonl, tensorboard/, images/, config.json and the run
      lock go.
    task: the model, loss and eval summary (nsmae_jax.pretrain.pretrain_task,
      nsmae_jax.finetune.bevseg_task, ...).
    train_iterator: replaces the input pipeline (tests): yields host batches [local_devices,
      per_device_batch, ...]; may offer get_state()/set_state() (saved with the checkpoint) and
      close(). The loop closes only iterators it created itself.
    eval_batches_fn: replaces the eval pipeline: returns a fresh iterable of batches per call
      (closed after each pass when it has close()).
    on_log: called on process 0 as on_log(step, metrics) at every log step and eval (eval keys
      prefixed 'eval_'), e.g. for a live plot in a notebook.

  Returns:
    TrainResult(state, metrics): see TrainResult.

  Raises:
    NonFiniteLossError, checkpointing.CheckpointWriteError, checkpointing.CheckpointDamagedError,
    workdir_lock.WorkdirLockedError: each message names the step or directory concerned.
  """
  tc = config.train
  distributed.maybe_initialize(tc)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  lock_name = 'run.lock' if jax.process_index() == 0 else f'run.process{jax.process_index()}.lock'
  # Unwound in reverse: iterators and writers close, then pending saves finish (still under
  # the SIGTERM handler, so a late signal cannot cut a save short), then the lock goes.
  with contextlib.ExitStack() as stack:
    stack.enter_context(WorkdirLock(workdir, lock_name))
    preemption = stack.enter_context(Preemption())
    ckpt = Checkpointer(workdir, max_to_keep=tc.max_to_keep, owner=True)
    stack.callback(ckpt.close)
    if train_iterator is None:
      from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
      train_iterator = pipeline.make_train_iterator(config, **task.train_data_kwargs)
      stack.callback(_close, train_iterator)
    if eval_batches_fn is None:
      from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel,reimported
      eval_batches_fn = functools.partial(pipeline.make_eval_iterator, config)

    rng = jax.random.PRNGKey(tc.seed)
    init_rng, step_rng, eval_rng, image_rng = jax.random.split(rng, 4)
    say = (lambda m: print(m, flush=True)) if is_main else (lambda m: None)
    state, start = restore_or_initialize(ckpt, create_train_state(config, task, init_rng), task,
                                         train_iterator, say)
    if is_main:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(config.to_dict(), f, indent=1)

    writer = stack.enter_context(contextlib.closing(
        MetricWriter(workdir, enabled=is_main, resume_step=start)))
    progress = stack.enter_context(contextlib.closing(
        Progress(tc.num_train_steps, start, task.headline, enabled=is_main, desc=task.name)))
    parallel = sharding.make(tc.parallelism, task.loss_fn)
    run = _Run(
        config=config, task=task, ckpt=ckpt, writer=writer, progress=progress,
        train_iterator=train_iterator, eval_batches_fn=eval_batches_fn, on_log=on_log,
        is_main=is_main, parallel=parallel, rstate=parallel.replicate(state),
        step_rng=parallel.replicate(step_rng), eval_rng=parallel.replicate(eval_rng),
        image_rng=image_rng)
    del state

    if start == 0 and tc.eval_every_steps and not preemption.requested:
      run.evaluate(0)  # the baseline that later evals are compared with
    preempted_at = run.train(start, preemption)
    metrics = dict(run.last)
    if preempted_at is not None:
      metrics['preempted_at_step'] = preempted_at
    elif start < tc.num_train_steps and not _due(tc.num_train_steps, tc.eval_every_steps):
      run.evaluate(tc.num_train_steps)  # the final eval, unless the periodic one just ran
    ckpt.wait()
    metrics.update({f'eval_{k}': v for k, v in run.last_eval.items()})
    return TrainResult(parallel.to_host(run.rstate), metrics)
