"""The BEV map segmentation Task for the shared training loop (nsmae_jax.train).

  state, metrics = train_and_evaluate(config, workdir, bevseg_task(config, workdir))

On a fresh start, the backbone (LiDAR + camera encoders, lifting, fusion) is restored from the
newest verified checkpoint of config.finetune.init_workdir (empty = from scratch); the head is
always fresh. What was loaded and what stayed fresh is printed and written to
<workdir>/init_report.json. Eval sums TP/FP/FN per class and threshold over the whole val split
(use --eval_batches=0) and reports BEVFusion's mIoU (nsmae_jax.finetune.metrics).

--modalities=camera|lidar fine-tunes a single-modality model (nsmae_jax.models.backbone): only
the present encoders and fusion leaves exist, and only they are restored. --drop_modality
evaluates a joint model with one sensor's input removed (training is unchanged);
evaluate_checkpoint re-evaluates a finished fine-tuning that way.
"""

from __future__ import annotations

import json
import os
import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax import jax_utils

from nsmae_jax.config import Config, ConfigError
from nsmae_jax.data import augment
from nsmae_jax.data.fake import fake_batch
from nsmae_jax.finetune import metrics as metrics_lib
from nsmae_jax.finetune.head import BEVSegModel, seg_loss
from nsmae_jax.models.backbone import drop_modality, modalities
from nsmae_jax.train import steps as steps_lib
from nsmae_jax.train.checkpointing import restore_subtree
from nsmae_jax.train.task import Task


def _leaves(tree: Any, prefix: str = '') -> list[tuple[str, Any]]:
  """(slash path, leaf) of a nested dict, in sorted-key order."""
  if isinstance(tree, Mapping):
    out = []
    for k in sorted(tree):
      out += _leaves(tree[k], f'{prefix}/{k}' if prefix else str(k))
    return out
  return [(prefix, tree)]


def init_from_pretrained(params: dict, init_workdir: str, step: int | None = None
                         ) -> tuple[dict, dict]:
  """params {'backbone', 'head'} -> (params with the backbone restored, report).

  The backbone subtree comes from `<init_workdir>/checkpoints/<step>/state` at
  ('params', 'backbone') (the newest step whose checksums verify by default); the head keeps
  its fresh values. An empty init_workdir loads nothing. report: {'init_workdir', 'step',
  'loaded': [paths], 'fresh': [paths], 'loaded_params', 'fresh_params'} (paths 'backbone/...',
  'head/...').
  """
  params = dict(params)
  loaded_step = None
  if init_workdir:
    restored, loaded_step = restore_subtree(init_workdir, params['backbone'],
                                            prefix=('params', 'backbone'), step=step)
    params['backbone'] = jax.tree_util.tree_map(jnp.asarray, restored)
    loaded_keys = {'backbone'}
  else:
    loaded_keys = set()
  loaded, fresh, n_loaded, n_fresh = [], [], 0, 0
  for path, leaf in _leaves(params):
    if path.split('/')[0] in loaded_keys:
      loaded.append(path)
      n_loaded += int(np.size(leaf))
    else:
      fresh.append(path)
      n_fresh += int(np.size(leaf))
  report = dict(init_workdir=init_workdir, step=loaded_step, loaded=loaded, fresh=fresh,
                loaded_params=n_loaded, fresh_params=n_fresh)
  return params, report


def eval_inputs(config: Config) -> Callable[[dict], dict]:
  """batch -> the batch an eval step feeds the model: with --drop_modality, that sensor's input
  removed (drop_modality); else unchanged. Raises ConfigError unless the model is joint (a
  single-modality model does not read the other sensor, and without its own it has none)."""
  fc = config.finetune
  if not fc.drop_modality:
    return lambda batch: batch
  if modalities(config) != ('camera', 'lidar'):
    raise ConfigError(f'--drop_modality: removes a sensor from a joint model; this one reads '
                      f'only --modalities={fc.modalities}')
  return functools.partial(drop_modality, modality=fc.drop_modality)


def print_init_report(report: dict, config: Config, workdir: str | None) -> None:
  """Prints what init_from_pretrained loaded (process 0) and writes <workdir>/init_report.json."""
  if jax.process_index() != 0:
    return
  fc = config.finetune
  report = dict(report, modalities=list(modalities(config)))
  src = f'{fc.init_workdir} step {report["step"]}' if fc.init_workdir else 'nothing (scratch)'
  fresh_modules = sorted({'/'.join(p.split('/')[:2]) for p in report['fresh']})
  print(f'init ({fc.modalities}): loaded {len(report["loaded"])} leaves / '
        f'{report["loaded_params"]:,} params from {src}; fresh {len(report["fresh"])} leaves / '
        f'{report["fresh_params"]:,} params ({", ".join(fresh_modules)})', flush=True)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'init_report.json'), 'w') as f:
      json.dump(report, f, indent=1)


def evaluate_checkpoint(config: Config, workdir: str, task: Task,
                        eval_batches_fn: Callable[[], Iterable[dict]] | None = None,
                        step: int | None = None) -> dict:
  """One eval pass of the fine-tuned params of `workdir` (its newest verified checkpoint, or
  `step`) with `task` (built from `config`, e.g. with --drop_modality set); returns the task's
  eval summary. Writes nothing into `workdir` (a det3d task writes under its own workdir).

  eval_batches_fn: a fresh iterable of host batches [local_devices, B, ...] (default: the val
  pipeline); config.train.eval_batches of them (0 = all).
  """
  example = fake_batch(config, config.train.per_device_batch_size)  # shapes only
  shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), example)
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params, _ = restore_subtree(workdir, target, prefix=('params',), step=step)
  if eval_batches_fn is None:
    from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    eval_batches_fn = functools.partial(pipeline.make_eval_iterator, config)
  # Its own small pmap loop (the training loop's evaluate is tied to its run state); the step is
  # the loop's eval_step, so the sums and the summary are those of a training run's eval.
  p_eval = jax.pmap(functools.partial(steps_lib.eval_step, loss_fn=task.loss_fn),
                    axis_name='batch')
  rparams = jax_utils.replicate(params)
  rng = jax_utils.replicate(jax.random.PRNGKey(config.train.seed))
  sums, batches = None, eval_batches_fn()
  try:
    for i, batch in enumerate(batches):
      if config.train.eval_batches and i >= config.train.eval_batches:
        break
      numeric = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in 'biuf'}
      out = jax.device_get(jax_utils.unreplicate(p_eval(rparams, numeric, rng)))
      sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
  finally:
    if hasattr(batches, 'close'):
      batches.close()
  return {} if sums is None else task.eval_summary(sums)


def _to_image(a: np.ndarray) -> np.ndarray:
  """[X, Y] grid (LiDAR frame) -> [rows, cols] image with +y (forward) up and +x right."""
  return np.flipud(np.asarray(a).T)


def bev_panel(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """probs, labels [C, X, Y] -> RGB [C * X, 2 * Y + gap, 3] in [0, 1]: per class (rows in
  MAP_CLASSES order) the predicted probability (left) and the ground truth (right), forward up."""
  c, x, y = probs.shape
  gap = 2
  rows = []
  for k in range(c):
    row = np.ones((y, 2 * x + gap), np.float32)
    row[:, :x] = _to_image(probs[k])
    row[:, x + gap:] = _to_image(labels[k] > 0)
    rows.append(row)
    rows.append(np.ones((gap, 2 * x + gap), np.float32) * 0.5)
  gray = np.concatenate(rows[:-1], axis=0)
  return np.repeat(gray[..., None], 3, axis=-1)


def finetune_task_kwargs(config: Config, workdir: str | None) -> dict[str, Any]:
  """The Task fields every fine-tuning task shares: restore the pre-trained backbone at step 0
  (reported), the backbone's learning-rate scale, the labelled subset of the training split and
  its augmentation (--augment)."""
  fc = config.finetune

  def prepare_params(params):
    params, report = init_from_pretrained(params, fc.init_workdir)
    print_init_report(report, config, workdir)
    return params

  def lr_scales(params):
    """The backbone learns at backbone_lr_scale x the head's rate (0 = frozen)."""
    return {k: fc.backbone_lr_scale if k == 'backbone' else 1.0 for k in params}

  return dict(prepare_params=prepare_params,
              lr_scales=None if fc.backbone_lr_scale == 1.0 else lr_scales,
              train_data_kwargs=dict(label_fraction=fc.label_fraction,
                                     subset_seed=fc.subset_seed,
                                     augmentation=(augment.Augmentation() if fc.augment
                                                   else None)))


def save_result(config: Config, workdir: str, result: Mapping[str, Any]) -> None:
  """<workdir>/result.json: the final metrics and what identifies the cell (init, labels, seed).

  Nothing is written for a run stopped before its last step (SIGTERM: 'preempted_at_step' in
  `result`): result.json marks a finished run, and a rerun resumes this one.
  """
  if result.get('preempted_at_step') is not None:
    print(f'{workdir}: stopped at step {result["preempted_at_step"]}; no result.json (rerun '
          'to resume)', flush=True)
    return
  fc = config.finetune
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(dict(result, init_workdir=fc.init_workdir, label_fraction=fc.label_fraction,
                   subset_seed=fc.subset_seed, seed=config.train.seed, augment=fc.augment), f,
              indent=1)


def bevseg_task(config: Config, workdir: str | None = None) -> Task:
  """The segmentation Task: BEVSegModel, focal/BCE loss, BEVFusion mIoU, pred-vs-GT images."""
  model = BEVSegModel(config)
  fc = config.finetune
  eval_view = eval_inputs(config)

  # jit: an eager init/apply of the backbone dispatches thousands of small ops (over a minute
  # on a loaded 2-core machine); compiled, it is one call.
  init_params = jax.jit(lambda rng, batch: model.init({'params': rng}, batch,
                                                      train=False)['params'])
  predict = jax.jit(lambda params, batch: jax.nn.sigmoid(
      model.apply({'params': params}, batch, train=False)))

  def loss_fn(params, batch, rng, train):
    del rng  # no masking or dropout in fine-tuning
    if not train:
      batch = eval_view(batch)
    logits = model.apply({'params': params}, batch, train=train)  # [B, X, Y, C]
    labels = jnp.moveaxis(batch['bev_map'], -3, -1)              # [B, C, X, Y] -> [B, X, Y, C]
    loss = seg_loss(logits, labels, fc.seg_loss)
    out = {'seg_loss': loss}
    if not train:
      # The training loop averages train metrics into scalars: counts only matter in eval.
      probs = jnp.moveaxis(jax.nn.sigmoid(logits), -1, -3)
      out.update(metrics_lib.flatten_counts(*metrics_lib.confusion_counts(
          probs, batch['bev_map'])))
    return loss, {'metrics': out}

  def eval_summary(sums):
    count = max(float(sums['count']), 1.0)
    summary = metrics_lib.summarize(*metrics_lib.unflatten_counts(sums))
    summary['seg_loss'] = float(sums['seg_loss']) / count
    summary['loss'] = float(sums['loss']) / count
    summary['examples'] = float(sums['count'])
    return summary

  def render_images(params, batch, rng):
    del rng
    ex = jax.tree_util.tree_map(lambda a: a[:1], batch)
    probs = np.asarray(predict(params, ex)[0])  # [X, Y, C]
    return {'bev_pred_vs_gt': bev_panel(np.moveaxis(probs, -1, 0), np.asarray(ex['bev_map'][0]))}

  return Task(name='bevseg', model=model, init_params=init_params, loss_fn=loss_fn,
              render_images=render_images, eval_summary=eval_summary,
              **finetune_task_kwargs(config, workdir), headline=('loss', 'miou'))
