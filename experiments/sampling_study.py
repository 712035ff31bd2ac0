r"""Rendered depth error vs field evaluations per ray, with and without LiDAR-guided sampling.

  nice -n 10 python -m experiments.sampling_study \
      --flagfile=experiments/configs/sampling_study.flags

Two parts, each setting's result kept in --study_dir/results.json (a rerun skips the settings
already there; a setting's workdir resumes from its checkpoint):
  train: one short pre-training per --train_settings entry (`sampling:S`, S = samples per ray =
    field evaluations per ray; sampling stratified, lidar, or lidar_carve = lidar with
    --free_space_carving), scored by the pre-training's held-out eval (val split, unmasked
    inputs and masked inputs, deterministic samples, the same sampler as in training).
  cross: every trained model re-scored on the val split with the --cross_eval sampler: the
    field each setting learned, judged by one common dense sampler. Needed because a
    LiDAR-guided render puts its samples at the depth target's surface by construction; its own
    depth error can then be low without the field having learned that surface.
  eval: the model trained with --eval_model re-scored on the same val split with each
    --eval_settings sampler: the same field, only the sample placement changes.
  oracle: no learning: a known field (--oracle_density 1/m times the trilinear interpolation
    of the val frame's undilated LiDAR occupancy, --occupancy_cell cells) rendered along the val
    frames' LiDAR rays with each --oracle_settings sampler, against the same field rendered
    with 4096 stratified samples (the converged depth) and against the LiDAR depth: the
    quadrature error alone, on a field whose surfaces are where the depth loss puts them. Also
    the share of each sampler's samples in seen-free cells (the carved grid's 0) and within
    1 m of the LiDAR depth.
  quadrature: the quadrature error on learned fields: each --quadrature_models model renders
    the val frames' perspective rays (unmasked inputs, deterministic samples) with each
    --quadrature_settings sampler, scored against the same model rendered with
    --quadrature_reference (dense stratified: its converged depth) and against the LiDAR depth.
    The reference is the field's own render, not the LiDAR, so guided samples gain nothing
    here by sitting at the depth target (the leak the other parts have): only by resolving
    the surfaces the field has learned with fewer evaluations.
    A sampler ideal:S[:a] there is the bound for any proposal pass (ideal_proposal_render):
    S samples placed by the field's own compositing weights at --coarse_samples bins (a of the
    pdf uniform, default 0.5), charged S + coarse field evaluations.
Prints markdown tables (docs/lidar_sampling.md holds the measured ones).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import numpy as np

from experiments import data
from experiments import flags as nsflags
from nsmae_jax import train
from nsmae_jax.data import pipeline
from nsmae_jax.pretrain import pretrain_task
from nsmae_jax.train import loop, sharding

_STUDY_DIR = flags.DEFINE_string('study_dir', 'runs/sampling_study',
                                 'Workdirs of the settings and results.json.')
_TRAIN = flags.DEFINE_list('train_settings', ['stratified:16', 'stratified:32', 'lidar:8',
                                              'lidar:16'],
                           'Pre-trainings to run, each sampling:samples_per_ray[:seed] (seed: '
                           '--seed of the flagfile when left out).')
_EVAL_MODEL = flags.DEFINE_string('eval_model', 'stratified:32', 'The train setting whose final '
                                  'model the eval-only sweep re-scores (empty = no sweep).')
_EVAL = flags.DEFINE_list('eval_settings', ['stratified:8', 'stratified:16', 'stratified:64',
                                            'lidar:8', 'lidar:16'],
                          'Samplers of the eval-only sweep, each sampling:samples_per_ray.')
_CROSS = flags.DEFINE_string('cross_eval', 'stratified:64', 'The common sampler every trained '
                             'model is re-scored with (empty = skip).')
_ORACLE = flags.DEFINE_list('oracle_settings', ['stratified:8', 'stratified:16', 'stratified:32',
                                                'stratified:64', 'stratified:128', 'lidar:4',
                                                'lidar:8', 'lidar:16', 'lidar:32'],
                            'Samplers of the oracle-field part (empty = skip it); '
                            'lidar_carve:S = lidar with --free_space_carving.')
_ORACLE_DENSITY = flags.DEFINE_float('oracle_density', 20.0, 'Density (1/m) of the oracle '
                                     'field in its occupied cells.')

_QUAD_MODELS = flags.DEFINE_list('quadrature_models', [], 'Train settings (of --train_settings or '
                                 'already in results.json) whose final models the quadrature '
                                 'part renders (empty = skip it).')
_QUAD = flags.DEFINE_list('quadrature_settings', ['stratified:4', 'stratified:8', 'stratified:16',
                                                  'stratified:32', 'lidar:4', 'lidar:8',
                                                  'lidar:16'],
                          'Samplers of the quadrature part, each sampling:samples_per_ray, '
                          'or ideal:S[:uniform_fraction] (the field\'s own weights as the pdf).')
_QUAD_REF = flags.DEFINE_string('quadrature_reference', 'stratified:512', 'The dense sampler '
                                'whose render of the same model is the converged depth.')

# Held-out figures reported (eval_summary keys; the pre-training eval's names).
METRICS = ('depth_abs_rel', 'perspective_depth_loss', 'perspective_psnr', 'bev_depth_loss',
           'masked_depth_abs_rel', 'masked_perspective_depth_loss')
# Also scored on the training split (prefixed 'fit_').
FIT = ('depth_abs_rel', 'perspective_depth_loss')


def _setting(name: str) -> dict:
  """'sampling:S[:seed]' -> config overrides (sampling lidar_carve: lidar with
  --free_space_carving)."""
  sampling, samples, *seed = name.split(':')
  out = dict(sampling=sampling, num_samples=int(samples))
  if sampling == 'lidar_carve':
    out.update(sampling='lidar', free_space_carving=True)
  if seed:
    out['seed'] = int(seed[0])
  return out


def _sampler_config(base, name: str):
  """`base` with the sampler of setting `name` (its seed, if any, left out)."""
  return base.replace(**{k: v for k, v in _setting(name).items() if k != 'seed'})


def _frame_sums(config, errors, split: str = 'val') -> tuple[list[float], float]:
  """sum over `split`'s frames (one at a time, stored order) of errors(example [1, ...],
  PRNGKey(frame index)) -> a tuple of scalars; -> (the sums, wall seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  start, sums = time.time(), 0.0
  iterator = pipeline.make_eval_iterator(config.replace(per_device_batch_size=1), split=split,
                                         num_local_devices=1)
  try:
    for i, batch in enumerate(iterator):
      ex = {k: jnp.asarray(v[0]) for k, v in batch.items() if k != 'valid'}
      sums = sums + np.array([float(x) for x in errors(ex, jax.random.PRNGKey(i))])
  finally:
    iterator.close()
  return np.asarray(sums).tolist(), round(time.time() - start, 1)


def _load(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {'train': {}, 'eval': {}}


def _save(path: str, results: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=1)
  os.replace(path + '.tmp', path)


def _workdir(name: str) -> str:
  return os.path.join(_STUDY_DIR.value, name.replace(':', '_'))


def _steps_per_s(name: str) -> float:
  """Median logged training steps/s of a setting's run (compilation excluded)."""
  with open(os.path.join(_workdir(name), 'metrics.jsonl')) as f:
    rates = [r['steps_per_second'] for r in map(json.loads, f) if 'steps_per_second' in r]
  return float(np.median(rates[1:] or rates))   # the first log window holds the compile


def _train(base, name: str, fit: bool = True) -> tuple[dict, dict]:
  """Pre-trains one setting (a finished workdir only restores); -> (held-out metrics, the
  final params). With fit, a restored run has no final eval (a run that died in it, as the
  study's LLVM 'Cannot allocate memory' aborts do after many compiles in one process): its
  held-out metrics are then re-scored with its own sampler (_rescore: the loop's eval, same
  rng)."""
  config = base.replace(**_setting(name), workdir=_workdir(name))
  start = time.time()
  state, metrics = train.train_and_evaluate(config, config.train.workdir, pretrain_task(config))
  out = {k: metrics[f'eval_{k}'] for k in METRICS if f'eval_{k}' in metrics}
  if fit and not out:
    out = _rescore(base, state.params, name)
  out['wall_s'] = round(time.time() - start, 1)   # compile + train + held-out eval
  if fit:
    out.update(_fit(base, state.params, name))
  return out, state.params


def _rescore(base, params, name: str, split: str = 'val') -> dict:
  """The pre-training eval's figures of `params` with the sampler `name` on `split` (all of it
  with --eval_batches=0)."""
  import jax  # pylint: disable=import-outside-toplevel
  config = _sampler_config(base, name)
  task = pretrain_task(config)
  parallel = sharding.make(config.train.parallelism, task.loss_fn)
  rng = jax.random.split(jax.random.PRNGKey(config.train.seed), 4)[2]   # the loop's eval rng
  start = time.time()
  iterator = pipeline.make_eval_iterator(config, split=split)
  try:
    summary = loop.evaluate(task, parallel, parallel.replicate(params), parallel.replicate(rng),
                            iterator, config.train.eval_batches)
  finally:
    iterator.close()
  out = {k: float(summary[k]) for k in METRICS if k in summary}
  out['wall_s'] = round(time.time() - start, 1)
  return out


def _fit(base, params, name: str) -> dict:
  """Depth error on the training split (the fit, where the field has seen the scene)."""
  r = _rescore(base, params, name, split='train')
  return {f'fit_{k}': r[k] for k in FIT}


def _oracle(base, name: str) -> dict:
  """Depth error of the oracle field (module docstring) on the val split's perspective LiDAR
  rays (--perspective_rays / 2 per frame) with the sampler `name`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nsmae_jax.pretrain import targets  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render import box_near_far, render_rays  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render import guidance  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render.sampling import trilinear_interpolate  # pylint: disable=import-outside-toplevel
  config = base.replace(**_setting(name))
  r, (lo, hi) = config.render, config.volume_bounds
  guide = guidance.grid_shape(lo, hi, r.occupancy_cell)

  @jax.jit
  def errors(batch, key):
    view = targets.draw_rays(config, key, batch)['perspective']
    grid = lambda p, v, shape, d: jax.vmap(
        lambda p, v: guidance.occupancy_grid(p[:, :3], v, lo, hi, shape, d))(p, v)
    sharp = grid(batch['points'], batch['points_mask'], guide, 0)[0][..., None]
    # The three-state grid: the carved sampler's guide, and for every sampler the count of its
    # samples in seen-free cells.
    carved = jax.vmap(lambda p, v: guidance.carved_occupancy_grid(
        p[:, :3], v, lo, hi, guide, r.occupancy_dilation))(batch['points'], batch['points_mask'])
    occ = None
    if r.free_space_carving:
      occ = carved
    elif r.sampling == 'lidar':
      occ = grid(batch['points'], batch['points_mask'], guide, r.occupancy_dilation)
    field = lambda f, p, d: (_ORACLE_DENSITY.value * trilinear_interpolate(
        sharp, p.reshape(-1, 3), lo, hi)[:, 0].reshape(p.shape[:-1]), jnp.zeros_like(p))
    n, f, hit = box_near_far(view['origins'], view['dirs'], lo, hi, view['near'])
    render = lambda s, occ: render_rays(
        field, jnp.zeros((1, 2, 2, 2, 1)), view['origins'], view['dirs'], n, f, s, lo, hi, None,
        occupancy=occ, coarse_samples=r.coarse_samples, uniform_fraction=r.uniform_fraction,
        free_space_carving=r.free_space_carving)
    out, converged = render(r.num_samples, occ), render(4096, None)['depth']
    depth, t = out['depth'], out['t']                                        # [1, R], [1, R, S]
    points = view['origins'][:, :, None] + t[..., None] * view['dirs'][:, :, None]
    state = guidance.occupancy_lookup(carved[0], points.reshape(-1, 3), lo, hi,
                                      guidance.UNKNOWN).reshape(t.shape)
    ok = (view['depth_valid'] & hit).astype(jnp.float32)
    err = jnp.abs(depth - view['depth'])
    return (jnp.sum(jnp.abs(depth - converged) * ok), jnp.sum(err * ok),
            jnp.sum(err / jnp.maximum(view['depth'], 1e-3) * ok), jnp.sum(ok),
            jnp.sum(jnp.mean(state == 0, -1) * ok),
            jnp.sum(jnp.mean(jnp.abs(t - view['depth'][..., None]) <= 1.0, -1) * ok))

  sums, wall = _frame_sums(config, errors)
  return dict(vs_converged=sums[0] / sums[3], perspective_depth_loss=sums[1] / sums[3],
              depth_abs_rel=sums[2] / sums[3], rays=int(sums[3]), free_share=sums[4] / sums[3],
              near_share=sums[5] / sums[3], wall_s=wall)


def _ideal(name: str) -> tuple[int, float] | None:
  """'ideal:S[:a]' -> (S, a) (a = the pdf's uniform share, default 0.5); other names -> None."""
  kind, *rest = name.split(':')
  if kind != 'ideal':
    return None
  if not 1 <= len(rest) <= 2:
    raise ValueError(f'sampler {name!r}: expected ideal:S or ideal:S:uniform_fraction')
  return int(rest[0]), float(rest[1]) if len(rest) > 1 else 0.5


def field_evals(name: str, coarse_samples: int) -> int:
  """Field evaluations per ray of a sampler name (ideal:S costs its coarse pass too)."""
  ideal = _ideal(name)
  return _setting(name)['num_samples'] if ideal is None else ideal[0] + coarse_samples


def ideal_proposal_render(module, volume, origins, dirs, near, num_samples: int,
                          coarse_samples: int, uniform_fraction: float) -> dict:
  """The best sample placement a proposal pass can give (NeRF's hierarchical sampling, mip-NeRF
  360's proposal MLP, or LiDAR guidance): the field itself at `coarse_samples` bin centres per
  ray, its compositing weights (plus `uniform_fraction` spread evenly) as the pdf, S samples by
  inverse CDF (guidance.inverse_cdf_samples, deterministic quantiles), the field then
  rendered with those S only (render_at). A bound for placement, not a sampler: it costs
  coarse + S field evaluations, and no cheaper proposal knows the field's weights better.
  `module`: a bound pre-training model (model.apply(..., method=functools.partial(this, ...)))."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render import (box_near_far, render_at,  # pylint: disable=import-outside-toplevel
                                stratified_samples)
  from nsmae_jax.render.guidance import inverse_cdf_samples  # pylint: disable=import-outside-toplevel
  n, f, _ = box_near_far(origins, dirs, module.box_min, module.box_max, near)
  background = (nn.sigmoid(module.background) if module.config.render.background == 'learned'
                else None)
  bins = jax.vmap(jax.vmap(lambda a, b: stratified_samples(None, a, b, coarse_samples)))
  coarse = render_at(module.field, volume, origins, dirs, *bins(n, f), f, module.box_min,
                     module.box_max)
  place = lambda w, a, b: inverse_cdf_samples(w, a, b, num_samples, uniform_fraction)
  t, deltas = jax.vmap(jax.vmap(place))(coarse['weights'], n, f)
  return render_at(module.field, volume, origins, dirs, t, deltas, f, module.box_min,
                   module.box_max, background)


def quadrature(base, params, name: str, reference_name: str, split: str = 'val') -> dict:
  """Depth of a trained model's `params` on `split`'s perspective rays (unmasked inputs,
  deterministic samples) with the sampler `name` against the same model with the sampler
  `reference_name` (module docstring): vs_converged (mean |d - d_ref|, m), perspective_depth_loss
  and depth_abs_rel (against the LiDAR depth), rays (scored: valid depth, hit the volume),
  field_evals (per ray). `name` may be ideal:S[:a] (ideal_proposal_render, with
  --coarse_samples bins)."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nsmae_jax.pretrain import build_pretrain_model, targets  # pylint: disable=import-outside-toplevel
  ideal = _ideal(name)
  config = _sampler_config(base, name if ideal is None else f'stratified:{ideal[0]}')
  model = build_pretrain_model(config)
  reference = build_pretrain_model(_sampler_config(base, reference_name))
  variables = {'params': params}
  coarse = config.render.coarse_samples

  @jax.jit
  def errors(batch, key):
    view = targets.draw_rays(config, key, batch)['perspective']
    feats = model.apply(variables, batch, mask=False, method=model.encode)
    volume = model.apply(variables, feats, method=model.view_volumes)['perspective']
    rays = (volume, view['origins'], view['dirs'], view['near'])
    if ideal is None:
      occ = model.apply(variables, batch, method=model.occupancy)
      out = model.apply(variables, *rays, None, occ, method=model.render)
    else:
      out = model.apply(variables, *rays, method=functools.partial(
          ideal_proposal_render, num_samples=ideal[0], coarse_samples=coarse,
          uniform_fraction=ideal[1]))
    ref = reference.apply(variables, *rays, None, method=reference.render)
    ok = (view['depth_valid'] & ref['hit']).astype(jnp.float32)
    err = jnp.abs(out['depth'] - view['depth'])
    return (jnp.sum(jnp.abs(out['depth'] - ref['depth']) * ok), jnp.sum(err * ok),
            jnp.sum(err / jnp.maximum(view['depth'], 1e-3) * ok), jnp.sum(ok))

  sums, wall = _frame_sums(config, errors, split)
  return dict(vs_converged=sums[0] / sums[3], perspective_depth_loss=sums[1] / sums[3],
              depth_abs_rel=sums[2] / sums[3], rays=int(sums[3]), wall_s=wall,
              field_evals=field_evals(name, coarse))


def table(results: dict) -> str:
  """Markdown tables of results.json: seeds of a setting averaged (n = seeds; +- = half the
  range over seeds when n > 1)."""
  head = ('| setting | field evals / ray | n | depth AbsRel | L1 depth (m) | PSNR (dB) | BEV L1 '
          'depth (m) | masked AbsRel | masked L1 (m) | train-split AbsRel | train-split L1 (m) | '
          'steps/s | wall (s) |\n' + '|---' * 13 + '|\n')

  def rows(part):
    groups = {}
    for name, r in results[part].items():
      groups.setdefault(':'.join(name.split(':')[:2]), []).append(r)
    out = ''
    for name, rs in groups.items():
      cells = []
      for k in METRICS + tuple(f'fit_{k}' for k in FIT) + ('steps_per_s', 'wall_s'):
        v = np.array([r.get(k, np.nan) for r in rs])
        fmt = {'wall_s': '.0f', 'steps_per_s': '.1f'}.get(k, '.3f')
        cell = '-' if np.all(np.isnan(v)) else f'{v.mean():{fmt}}'
        if len(v) > 1 and k not in ('wall_s', 'steps_per_s') and cell != '-':
          cell += f' +- {(v.max() - v.min()) / 2:{fmt}}'
        cells.append(cell)
      out += (f'| {name} | {_setting(name)["num_samples"]} | {len(rs)} | ' + ' | '.join(cells)
              + ' |\n')
    return out

  out = '### Pre-trained and scored with each sampler\n\n' + head + rows('train')
  if results.get('oracle'):
    out += ('\n### Oracle field (no learning): quadrature error alone\n\n| setting | field evals / '
            'ray | L1 vs converged (m) | L1 vs LiDAR (m) | AbsRel vs LiDAR | samples in free '
            'cells | samples within 1 m of LiDAR depth | rays | wall (s) |\n'
            '|---|---|---|---|---|---|---|---|---|\n')
    pct = lambda o, k: f'{100 * o[k]:.1f}%' if k in o else '-'
    out += ''.join(f'| {name} | {_setting(name)["num_samples"]} | {o["vs_converged"]:.3f} | '
                   f'{o["perspective_depth_loss"]:.3f} | {o["depth_abs_rel"]:.3f} | '
                   f'{pct(o, "free_share")} | {pct(o, "near_share")} | {o["rays"]} | '
                   f'{o.get("wall_s", float("nan")):.0f} |\n'
                   for name, o in results['oracle'].items())
  if results.get('cross'):
    out += (f'\n### Each trained model re-scored with {results.get("cross_eval", "")}\n\n'
            + head.replace('| setting |', '| trained with |') + rows('cross'))
  if results['eval']:
    out += (f'\n### The {results.get("eval_model", "")} model re-scored with each sampler\n\n'
            + head + rows('eval'))
  if results.get('quadrature'):
    out += (f'\n### Learned fields: quadrature error against the same model\'s '
            f'{results.get("quadrature_reference", "")} render\n\n| trained with | sampler | '
            'field evals / ray | n | L1 vs converged (m) | L1 vs LiDAR (m) | AbsRel vs LiDAR | '
            'rays |\n|---|---|---|---|---|---|---|---|\n')
    groups = {}
    for key, o in results['quadrature'].items():
      model, sampler = key.split('@')
      groups.setdefault((':'.join(model.split(':')[:2]), sampler), []).append(o)
    for (model, sampler), rs in groups.items():
      def cell(k, rs=rs):
        v = np.array([o[k] for o in rs])
        return f'{v.mean():.3f}' + (f' +- {(v.max() - v.min()) / 2:.3f}' if len(v) > 1 else '')
      evals = rs[0]['field_evals'] if 'field_evals' in rs[0] else field_evals(sampler, 0)
      out += (f'| {model} | {sampler} | {evals} | {len(rs)} | '
              f'{cell("vs_converged")} | {cell("perspective_depth_loss")} | '
              f'{cell("depth_abs_rel")} | {sum(o["rays"] for o in rs)} |\n')
  return out


def main(argv):
  del argv
  base = nsflags.config_from_flags()
  data.ensure_data(base)   # also the persistent compilation cache
  os.makedirs(_STUDY_DIR.value, exist_ok=True)
  path = os.path.join(_STUDY_DIR.value, 'results.json')
  results = _load(path)
  results.setdefault('oracle', {})
  for name in _ORACLE.value:
    if name not in results['oracle']:
      results['oracle'][name] = _oracle(base, name)
      _save(path, results)
    print('oracle', name, results['oracle'][name], flush=True)
  params = {}
  for name in _TRAIN.value:
    if name not in results['train']:
      results['train'][name], params[name] = _train(base, name)
    results['train'][name]['steps_per_s'] = _steps_per_s(name)
    _save(path, results)
    print(name, results['train'][name], flush=True)
  results.setdefault('cross', {})
  if _CROSS.value:   # a run without the cross part keeps the earlier runs' sampler name
    results['cross_eval'] = _CROSS.value
  for name in _TRAIN.value if _CROSS.value else ():
    if name not in results['cross']:
      if name not in params:
        params[name] = _train(base, name, fit=False)[1]
      results['cross'][name] = _rescore(base, params[name], _CROSS.value)
      _save(path, results)
    print('cross', name, results['cross'][name], flush=True)
  if _EVAL_MODEL.value:
    if _EVAL_MODEL.value not in _TRAIN.value:
      raise SystemExit(f'--eval_model={_EVAL_MODEL.value} is not among --train_settings')
    if _EVAL_MODEL.value not in params:
      params[_EVAL_MODEL.value] = _train(base, _EVAL_MODEL.value, fit=False)[1]
    results['eval_model'] = _EVAL_MODEL.value
    for name in _EVAL.value:
      if name not in results['eval']:
        results['eval'][name] = _rescore(base, params[_EVAL_MODEL.value], name)
        results['eval'][name].update(_fit(base, params[_EVAL_MODEL.value], name))
        _save(path, results)
      print('eval', name, results['eval'][name], flush=True)
  results.setdefault('quadrature', {})
  if _QUAD_MODELS.value:
    earlier = results.get('quadrature_reference', _QUAD_REF.value)
    if results['quadrature'] and earlier != _QUAD_REF.value:
      raise SystemExit(f'--quadrature_reference={_QUAD_REF.value}: {path} holds quadrature '
                       f'results against {earlier}; use another --study_dir')
    results['quadrature_reference'] = _QUAD_REF.value
  for model_name in _QUAD_MODELS.value:
    for name in _QUAD.value:
      key = f'{model_name}@{name}'
      if key not in results['quadrature']:
        if model_name not in params:
          params[model_name] = _train(base, model_name, fit=False)[1]
        results['quadrature'][key] = quadrature(base, params[model_name], name,
                                                _QUAD_REF.value)
        _save(path, results)
      print('quadrature', key, results['quadrature'][key], flush=True)
  print(table(results))


if __name__ == '__main__':
  nsflags.adopt_into_main()
  nsflags.run(main)
