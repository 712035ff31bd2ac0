"""The 3D detection Task for the shared training loop (nsmae_jax.train).

  task = det3d_task(config, workdir)
  train_and_evaluate(config, workdir, task=task, eval_batches_fn=det3d_eval_batches(config))

The backbone is restored as for segmentation (nsmae_jax.finetune.task.init_from_pretrained);
the CenterHead is fresh (--modalities and --drop_modality as for segmentation). Training: focal
loss on the class heatmaps + det_reg_weight x L1 on the box regressions at the true centres
(targets.py). Evaluation: each eval example is decoded on
the device (decode.py); when its batch carries `index` (det3d_eval_batches adds it), the
detections are handed to the host with the record index. The loop sums eval metrics over
examples, which cannot carry boxes, so they travel through jax.debug.callback into this task's
buffer; eval_summary turns the buffer into a nuScenes result JSON (<workdir>/det3d/results.json,
global frame) and scores it with the devkit's DetectionEval (eval keys map, nds, mate, ...).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nsmae_jax.config import Config
from nsmae_jax.finetune.det3d import data as data_lib
from nsmae_jax.finetune.det3d import nusc
from nsmae_jax.finetune.det3d.decode import decode
from nsmae_jax.finetune.det3d.head import DetModel, det_cells
from nsmae_jax.finetune.det3d.targets import center_targets, focal_loss, regression_loss
from nsmae_jax.finetune.det3d.viz import bev_boxes_image
from nsmae_jax.finetune.task import eval_inputs, finetune_task_kwargs
from nsmae_jax.train.task import Task


class DetectionBuffer:
  """Host-side detections of the current evaluation pass, by record index (thread-safe: XLA
  runs host callbacks on its own threads)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._items: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def add(self, index, boxes, scores, labels, valid) -> None:
    """One example: index scalar, boxes [K, 9], scores [K], labels [K], valid [K]."""
    keep = np.asarray(valid, bool)
    item = (np.asarray(boxes)[keep], np.asarray(scores)[keep], np.asarray(labels)[keep])
    with self._lock:
      # Padding slots of the last eval batch repeat record 0: the same detections again.
      self._items[int(index)] = item

  def pop_all(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    jax.effects_barrier()  # callbacks of the last batch have run
    with self._lock:
      items, self._items = self._items, {}
    return items


def det3d_eval_batches(config: Config, split: str = 'val'):
  """eval_batches_fn for train_and_evaluate: a fresh pass of eval batches with `index`."""
  return functools.partial(data_lib.eval_batches, config, split)


def results_from_detections(items: dict, metadata: list[dict], sample_tokens: list[str]
                            ) -> tuple[dict[str, list], float]:
  """{record index: (boxes [K, 9] LiDAR frame, scores, labels)} -> ({sample token: result
  entries} covering every token of `sample_tokens`, fraction of them that had detections
  computed). Samples without a prediction pass get an empty list (the devkit requires every
  sample of the split)."""
  results = {}
  for index, (boxes, scores, labels) in items.items():
    meta = metadata[index]
    results[meta['token']] = nusc.sample_results(meta['token'], boxes, scores, labels,
                                                 meta['lidar2ego'], meta['ego2global'])
  covered = sum(t in results for t in sample_tokens) / max(len(sample_tokens), 1)
  extra = sorted(set(results) - set(sample_tokens))
  if extra:
    raise ValueError(f'{len(extra)} evaluated key frames (e.g. {extra[0]}) are not in the '
                     f'devkit\'s split ({len(sample_tokens)} key frames): --det_eval_set does '
                     'not match the converted eval split, or the scene names are not the '
                     'official ones of that split (a synthetic world generated before they '
                     'were: delete its dataroot and converted data to regenerate them)')
  return {t: results.get(t, []) for t in sample_tokens}, covered


def det3d_task(config: Config, workdir: str | None = None) -> Task:
  """The detection Task: DetModel, CenterPoint losses, DetectionEval metrics, BEV pictures."""
  model = DetModel(config)
  dc = config.detection
  e, r, n = config.data.bev_half_extent, dc.det_resolution, det_cells(config)
  decode_fn = _decoder(config)
  predict = predict_fn(config, model)
  buffer = DetectionBuffer()
  out_dir = os.path.join(workdir or config.train.workdir, 'det3d')
  eval_view = eval_inputs(config)

  init_params = jax.jit(lambda rng, batch: model.init({'params': rng}, batch,
                                                      train=False)['params'])

  def loss_fn(params, batch, rng, train):
    del rng  # no masking or dropout in fine-tuning
    if not train:
      batch = eval_view(batch)
    out = model.apply({'params': params}, batch, train=train)
    heat, reg = out['heatmap'][0], out['regression'][0]      # [N, N, C], [N, N, 10]
    targets = center_targets(batch['boxes'][0], batch['box_labels'][0], batch['boxes_mask'][0],
                             half_extent=e, resolution=r, cells=n,
                             min_overlap=dc.det_min_overlap, min_radius=dc.det_min_radius)
    heatmap_loss = focal_loss(heat, targets.heatmap)
    reg_loss = regression_loss(reg, targets)
    loss = heatmap_loss + dc.det_reg_weight * reg_loss
    if not train and 'index' in batch:
      dets = decode_fn(heat, reg)
      jax.debug.callback(buffer.add, batch['index'][0], dets.boxes, dets.scores, dets.labels,
                         dets.valid)
    return loss, {'metrics': {'heatmap_loss': heatmap_loss, 'regression_loss': reg_loss}}

  def eval_summary(sums):
    count = max(float(sums['count']), 1.0)
    summary = {k: float(sums[k]) / count for k in ('loss', 'heatmap_loss', 'regression_loss')}
    summary['examples'] = float(sums['count'])
    items = buffer.pop_all()
    if not items:
      print('det3d: no detections reached the host (eval batches without `index`: pass '
            'eval_batches_fn=det3d_eval_batches(config)); DetectionEval skipped', flush=True)
      return summary
    if jax.process_count() > 1:
      print('det3d: multi-host DetectionEval is not implemented (each process holds its own '
            'detections); skipped', flush=True)
      return summary
    metadata = data_lib.split_metadata(config, 'val')
    tokens = nusc.split_sample_tokens(config.data.dataroot, config.data.version, dc.det_eval_set)
    results, covered = results_from_detections(items, metadata, tokens)
    if covered < 1.0:
      print(f'det3d: detections for {covered:.1%} of the {dc.det_eval_set} key frames (use '
            '--eval_batches=0): the others count as empty', flush=True)
    path = nusc.write_results(os.path.join(out_dir, 'results.json'), results)
    metrics = nusc.evaluate(path, config.data.dataroot, config.data.version, dc.det_eval_set,
                            out_dir, dc.det_eval_config)
    summary.update(metrics)
    summary['coverage'] = covered
    if jax.process_index() == 0:
      print(nusc.format_table(metrics), flush=True)
    return summary

  def render_images(params, batch, rng):
    del rng
    ex = jax.tree_util.tree_map(lambda a: a[:1], batch)
    dets, heat = jax.device_get(predict(params, ex))
    keep = np.asarray(dets.valid[0])
    # A camera-only batch may carry no points: the picture then shows boxes only.
    points = (np.asarray(ex['points'][0])[np.asarray(ex['points_mask'][0])] if 'points' in ex
              else np.zeros((0, 5), np.float32))
    gt = np.asarray(ex['boxes_mask'][0])
    return {'det_bev_pred_vs_gt': bev_boxes_image(
        points, np.asarray(ex['boxes'][0])[gt], np.asarray(ex['box_labels'][0])[gt],
        np.asarray(dets.boxes[0])[keep], np.asarray(dets.scores[0])[keep],
        np.asarray(dets.labels[0])[keep], e, heatmap=np.asarray(heat[0]))}

  return Task(name='det3d', model=model, init_params=init_params, loss_fn=loss_fn,
              render_images=render_images, eval_summary=eval_summary,
              **finetune_task_kwargs(config, workdir), headline=('loss', 'nds'))


def _decoder(config: Config) -> Callable:
  """decode() with the config's grid, top-k, threshold and NMS: (logits, regression) of one
  example -> Detections."""
  dc = config.detection
  return functools.partial(decode, half_extent=config.data.bev_half_extent,
                           resolution=dc.det_resolution, top_k=dc.det_top_k,
                           score_threshold=dc.det_score_threshold, nms=dc.det_nms)


def predict_fn(config: Config, model: DetModel | None = None) -> Callable:
  """jitted (params, batch [B, ...]) -> (Detections with [B, K, ...] fields (LiDAR frame),
  heatmap max over classes [B, N, N]), for pictures, notebooks and tools."""
  model = model or DetModel(config)
  decode_fn = _decoder(config)

  @jax.jit
  def predict(params, batch):
    out = model.apply({'params': params}, batch, train=False)
    dets = jax.vmap(decode_fn)(out['heatmap'], out['regression'])
    return dets, jnp.max(jax.nn.sigmoid(out['heatmap']), axis=-1)

  return predict
