"""train_and_evaluate: the pmap training loop shared by pre-training and fine-tuning.

One process per host; each reads its own part of the data. The per-device step (steps.py) is
pure; pmap is applied here, once. A killed run resumes from its latest checkpoint (train state
and data iterator position saved together); SIGTERM (preemption) saves before exit; a non-finite
loss stops the run naming the step range, without saving the bad state.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging
from flax import jax_utils

from nsmae_jax.config import Config
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.train import distributed
from nsmae_jax.train.checkpointing import Checkpointer
from nsmae_jax.train.metric_writer import MetricWriter, Progress
from nsmae_jax.train.optim import learning_rate_schedule, make_optimizer
from nsmae_jax.train.steps import TrainState, eval_step, train_step
from nsmae_jax.train.task import Task


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the message names the step range."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _numeric(batch: dict) -> dict:
  """Drops non-numeric entries (tokens, names) that cannot go to devices."""
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in 'biuf'}


def _replicate(tree: Any) -> Any:
  """Replicates onto the local devices with the sharding pmap outputs carry.

  flax's replicate() puts arrays on a differently named mesh than pmap's outputs; a pmapped
  function called with both (eval before and after training) would compile twice.
  """
  return jax.pmap(lambda x: x, axis_name='batch')(jax_utils.replicate(tree))


def _host_scalars(metrics: Any) -> dict[str, float]:
  metrics = jax.device_get(jax_utils.unreplicate(metrics))
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def evaluate(task: Task, p_eval, rparams, rng, batches, max_batches: int) -> dict:
  """Runs p_eval over `batches` (at most max_batches, 0 = all); returns the task's summary."""
  sums = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(jax_utils.unreplicate(p_eval(rparams, _numeric(batch), rng)))
    sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
  if sums is None:
    return {}
  return task.eval_summary(sums)


def train_and_evaluate(config: Config, workdir: str | None, task: Task,
                       train_iterator: Any = None,
                       eval_batches_fn: Callable[[], Iterable[dict]] | None = None,
                       return_state: bool = False,
                       on_log: Callable[[int, dict], None] | None = None) -> Any:
  """Trains `task` for config.train.num_train_steps.

  Resumes from the latest checkpoint in `workdir` (default config.train.workdir) when there is
  one. Returns the last logged train metrics merged with the last eval metrics (prefixed
  'eval_'). `train_iterator` replaces the tf.data pipeline (tests); it must yield host batches
  [local_devices, per_device_batch, ...] and may offer get_state()/set_state();
  `eval_batches_fn` likewise replaces the eval pipeline (a fresh pass per call).
  With return_state=True, returns (metrics, final host TrainState). `on_log(step, metrics)` is
  called on process 0 at every log step and eval (eval keys prefixed 'eval_'), e.g. for a live
  plot in a notebook.
  """
  workdir = workdir or config.train.workdir
  tc = config.train
  distributed.maybe_initialize(tc)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if train_iterator is None:
    from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    train_iterator = pipeline.make_train_iterator(config, **task.train_data_kwargs)
  if eval_batches_fn is None:
    from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel,reimported
    eval_batches_fn = functools.partial(pipeline.make_eval_iterator, config)

  rng = jax.random.PRNGKey(tc.seed)
  init_rng, step_rng, eval_rng, image_rng = jax.random.split(rng, 4)
  example = fake_batch(config, tc.per_device_batch_size)  # shapes only, for init
  params = jax.jit(task.init_params)(init_rng, example)  # eager init compiles op by op
  tx = make_optimizer(tc, task.lr_scales)
  state = TrainState.create(apply_fn=None, params=params, tx=tx)

  ckpt = Checkpointer(workdir, max_to_keep=tc.max_to_keep)
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(state)
    if data_state and hasattr(train_iterator, 'set_state'):
      train_iterator.set_state(data_state)
    logging.info('resumed %s from step %d', workdir, start)
    if is_main:
      print(f'Resuming from checkpoint at step {start} in {ckpt.directory}', flush=True)
  else:
    state = state.replace(params=task.prepare_params(state.params))
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=1)

  writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
  progress = Progress(tc.num_train_steps, start, enabled=is_main)
  schedule = learning_rate_schedule(tc)
  p_train = jax.pmap(functools.partial(train_step, loss_fn=task.loss_fn), axis_name='batch',
                     donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(eval_step, loss_fn=task.loss_fn), axis_name='batch')
  rstate = _replicate(state)
  r_step_rng = _replicate(step_rng)
  r_eval_rng = _replicate(eval_rng)
  del state

  last: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  last_checked = start
  t_log, s_log = time.time(), start

  def data_state():
    return train_iterator.get_state() if hasattr(train_iterator, 'get_state') else None

  def check_finite(step, metrics):
    nonlocal last_checked
    if not np.isfinite(metrics['loss']):
      raise NonFiniteLossError(
          f'non-finite loss ({metrics["loss"]}) between steps {last_checked + 1} and {step}; '
          f'the last good checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) is kept')
    last_checked = step

  def save(step, metrics):
    check_finite(step, _host_scalars(metrics))
    ckpt.save(step, jax_utils.unreplicate(rstate), data_state(), force=True)

  def run_eval(step):
    nonlocal last_eval
    last_eval = evaluate(task, p_eval, rstate.params, r_eval_rng, eval_batches_fn(),
                         tc.eval_batches)
    if last_eval:
      writer.scalars(step, last_eval, prefix='eval_')
      if on_log is not None and is_main:
        on_log(step, {f'eval_{k}': v for k, v in last_eval.items()})
      if is_main:
        print(f'eval @ {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in last_eval.items()),
              flush=True)

  # Whatever ends the loop (done, SIGTERM, NaN, an exception), pending asynchronous saves are
  # finished so the last good checkpoint is complete on disk.
  try:
    with _Preemption() as preemption:
      metrics = None
      if start == 0 and tc.eval_every_steps:
        run_eval(0)  # the baseline that later evals are compared with
      step = start
      for step in range(start + 1, tc.num_train_steps + 1):
        batch = _numeric(next(train_iterator))
        rstate, metrics = p_train(rstate, batch, r_step_rng)
        if step % tc.log_every_steps == 0 or step == tc.num_train_steps:
          last = _host_scalars(metrics)
          check_finite(step, last)
          now = time.time()
          last['steps_per_second'] = (step - s_log) / max(now - t_log, 1e-9)
          last['samples_per_second'] = last['steps_per_second'] * tc.per_device_batch_size * (
              jax.device_count())
          last['learning_rate'] = float(schedule(step - 1))
          t_log, s_log = now, step
          writer.scalars(step, last)
          progress.print(step, last)
          if on_log is not None and is_main:
            on_log(step, dict(last))
        if task.render_images is not None and is_main and tc.image_every_steps and (
            step % tc.image_every_steps == 0 or step == tc.num_train_steps):
          params0 = jax.device_get(jax_utils.unreplicate(rstate.params))
          batch0 = {k: v[0] for k, v in batch.items()}
          writer.images(step, task.render_images(params0, batch0, image_rng))
        if tc.eval_every_steps and step % tc.eval_every_steps == 0:
          run_eval(step)
        if step % tc.checkpoint_every_steps == 0 or preemption.requested:
          save(step, metrics)
        if preemption.requested:
          ckpt.wait()
          if is_main:
            print(f'SIGTERM: saved checkpoint at step {step}; exiting', flush=True)
          result = dict(last, preempted_at_step=step)
          return (result, jax.device_get(jax_utils.unreplicate(rstate))) if return_state else result
      if metrics is not None:
        if ckpt.latest_step() != step:
          save(step, metrics)
        if not tc.eval_every_steps or step % tc.eval_every_steps:
          run_eval(step)
  finally:
    ckpt.close()
    writer.close()
  result = dict(last, **{f'eval_{k}': v for k, v in last_eval.items()})
  return (result, jax.device_get(jax_utils.unreplicate(rstate))) if return_state else result
