r"""The label-efficiency grid: {scratch, pre-trained} x label fractions x seeds (+ ablations),
for BEV map segmentation and/or 3D detection (--tasks=bevseg,det3d).

  python -m experiments.label_efficiency \
      --flagfile=experiments/configs/label_efficiency_cpu.flags [--tasks=bevseg,det3d]

Pre-training runs first, once (<results_dir>/pretrain), shared by every task; then every
fine-tuning cell (<results_dir>/ft_<init>_f<fraction>_s<seed> for segmentation,
<results_dir>/det3d_<init>_f<fraction>_s<seed> for detection) with the same number of steps at
every fraction, each in a fresh process. A cell whose result.json exists is skipped and an
interrupted cell resumes from its checkpoint, so re-running the command continues the grid; a job
directory started with other settings is refused (ConfigError naming the flags). After every cell
the report of its task is rewritten by experiments.label_efficiency_report: <out_prefix>.csv (one
row per cell), <out_prefix>.md (mean +- std over seeds per fraction, and the gain) and
<out_prefix>.png (mIoU, or NDS and mAP, vs label fraction with the seed spread); detection writes
<out_prefix>_det3d.*. That module also rewrites a report alone from a results dir.

Ablations (--ablations=no_bev,no_mask,masked_only,lidar_mask_50,...; the list is ABLATIONS
below) pre-train once more with one part of the pretext changed (a view, a loss, the masking,
the masked-content weighting, a mask ratio, the colour:depth balance), in
<results_dir>/pretrain_<ablation>, and fine-tune at every --ablation_fractions for every seed.

Single-modality transfer: --modalities=camera (or lidar) runs the same grid with camera-only
(LiDAR-only) models restored from the same joint pre-training (which always stays joint), in
cells <prefix>-camera_<init>_f<fraction>_s<seed> and reports <out_prefix>_camera.*.
Robustness: --drop_modality=camera (or lidar) trains nothing: it evaluates every finished joint
cell again with that sensor's input removed (<cell>/drop_camera/result.json) and writes
<out_prefix>_drop_camera.*.

Augmented fine-tuning: --augment runs the grid (ablation cells included) with the fine-tuning
augmentation, from the same pre-training (which is never augmented), in cells
<prefix>[-<modality>]-aug_<init>_f<fraction>_s<seed> (e.g. ft-aug_pretrained_f0.1_s0) and
reports <out_prefix>[_<modality>]_aug.*; with --drop_modality it evaluates the augmented joint
cells and writes <out_prefix>_aug_drop_<sensor>.*.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from experiments import data
from experiments import flags as nsflags
from experiments import launch
from experiments import label_efficiency_report as report
from nsmae_jax.config import ConfigError

FLAGS = flags.FLAGS

_FRACTIONS = flags.DEFINE_list('fractions', ['0.01', '0.05', '0.1', '1.0'],
                               'Label fractions of the grid.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'],
                           'Fine-tuning seeds (parameter init, data order and label subset).')
_RESULTS_DIR = flags.DEFINE_string('results_dir', 'runs/label_efficiency',
                                   'Where the pre-training and every cell write their workdirs.')
_OUT_PREFIX = flags.DEFINE_string('out_prefix', '',
                                  'Path prefix of the CSV/markdown/PNG summary (default '
                                  '<results_dir>/label_efficiency).')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 0, 'Pre-training steps (0 = '
                                       '--num_train_steps).')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 0, 'Fine-tuning steps of every cell, '
                                       'at every fraction (0 = --num_train_steps).')
_FINETUNE_LR = flags.DEFINE_float('finetune_learning_rate', 0.0,
                                  'Fine-tuning peak learning rate (0 = --learning_rate).')
_INITS = flags.DEFINE_list('inits', ['scratch', 'pretrained'], 'Which initialisations to run.')
_TASKS = flags.DEFINE_list('tasks', ['bevseg'], 'Downstream tasks whose grids run (sharing the '
                           'pre-training): ' + ', '.join(report.TASKS) + '.')
_ABLATIONS = flags.DEFINE_list('ablations', [], 'Pre-training ablations to fine-tune at '
                               '--ablation_fractions (see ABLATIONS in this module).')
_ABLATION_FRACTIONS = flags.DEFINE_list('ablation_fractions', ['0.05'],
                                        'The label fractions of the ablation cells.')
_RUN_CELL = flags.DEFINE_string('run_cell', '', 'Internal: run the one job described by this '
                                'JSON file (a fresh process per cell) and exit.')

# One change to the pre-training config per ablation: a dict of overrides, or a function of
# the grid's config for changes relative to it. Names hold no '-' (cell directories use it).
ABLATIONS = {
    # Which views and losses carry the gain.
    'no_bev': dict(bev_color_weight=0.0, bev_depth_weight=0.0),
    'no_perspective': dict(perspective_color_weight=0.0, perspective_depth_weight=0.0),
    'no_depth': dict(bev_depth_weight=0.0, perspective_depth_weight=0.0),
    'no_color': dict(bev_color_weight=0.0, perspective_color_weight=0.0),
    # Masking, and what the loss scores.
    'no_mask': dict(image_mask_ratio=0.0, lidar_mask_ratio=0.0),
    'masked_only': dict(masked_loss='masked'),
    'masked_weighted': dict(masked_loss='weighted'),
    'all_targets': dict(masked_loss='all'),
    'lidar_mask_50': dict(lidar_mask_ratio=0.5),
    'lidar_mask_70': dict(lidar_mask_ratio=0.7),
    'lidar_mask_90': dict(lidar_mask_ratio=0.9),
    'image_mask_25': dict(image_mask_ratio=0.25),
    'image_mask_75': dict(image_mask_ratio=0.75),
    # The colour:depth balance, x10 either way (both views' depth weights scaled).
    'depth_x0p1': lambda c: dict(bev_depth_weight=c.loss.bev_depth_weight * 0.1,
                                 perspective_depth_weight=c.loss.perspective_depth_weight * 0.1),
    'depth_x10': lambda c: dict(bev_depth_weight=c.loss.bev_depth_weight * 10.0,
                                perspective_depth_weight=c.loss.perspective_depth_weight * 10.0),
}


def ablation_overrides(name: str, config) -> dict:
  """The config overrides of ablation `name` ('' = none) applied to `config`."""
  if not name:
    return {}
  if name not in ABLATIONS:
    raise ValueError(f'--ablations: unknown ablation {name!r}; known: {sorted(ABLATIONS)}')
  change = ABLATIONS[name]
  return change(config) if callable(change) else dict(change)


def plan(fractions, seeds, inits=('scratch', 'pretrained'), ablations=(),
         ablation_fractions=(0.05,)) -> list[tuple[str, float, int]]:
  """(init, fraction, seed) of every cell, seed-major so a partial grid has whole seeds; init
  is 'scratch', 'pretrained' or 'pretrained:<ablation>' (ablation cells last, one ablation
  after the other)."""
  cells = [(init, f, s) for s in seeds for f in fractions for init in inits]
  cells += [(f'pretrained:{a}', f, s) for a in ablations for s in seeds
            for f in ablation_fractions]
  return cells


def pretrain_dir(results_dir: str, ablation: str = '') -> str:
  return os.path.join(results_dir, 'pretrain' + (f'_{ablation}' if ablation else ''))


# Settings that do not change a job's result: a finished job run with other values still counts.
_BOOKKEEPING = {'workdir', 'log_every_steps', 'checkpoint_every_steps', 'image_every_steps',
                'max_to_keep', 'convert_workers', 'compilation_cache_dir', 'parallelism'}


def check_same_settings(workdir: str, config) -> None:
  """Raises ConfigError naming `workdir` and the flags that differ when the job there (finished
  or interrupted) was started with other settings than `config`: a resumed grid must not
  silently mix cells of two protocols."""
  from nsmae_jax.config import Config, ConfigError  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = Config.from_dict(json.load(f)).to_dict()
  want = config.to_dict()
  diff = [f'--{k}: {saved[g][k]!r} there, {v!r} now' for g in want for k, v in want[g].items()
          if k not in _BOOKKEEPING and saved[g][k] != v]
  if diff:
    raise ConfigError(f'{workdir} was run with other settings ({"; ".join(diff)}); delete it '
                      'or use another --results_dir')


def _finetune_fn(task: str):
  """The fine-tuning entry point of a downstream task: finetune(config, workdir) -> metrics."""
  # pylint: disable=import-outside-toplevel
  if task == 'det3d':
    from experiments import finetune_det3d
    return finetune_det3d.finetune
  from experiments import finetune_bevseg
  return finetune_bevseg.finetune


def _run_job(kind: str, config, workdir: str, in_process: bool) -> dict:
  """Runs one pre-training ('pretrain'), fine-tuning ('finetune:<task>') or sensor-drop
  evaluation ('evaluate:<task>', of the cell config.train.workdir) job; returns its metrics.

  Out of process by default: XLA:CPU never unmaps the code of executables it loaded, so two
  dozen runs in one process ran out of memory mappings ("LLVM ERROR: Unable to allocate section
  memory") after 14 cells. A fresh process per cell costs a few seconds of imports; the
  persistent compilation cache still spares the compiles.
  """
  # pylint: disable=import-outside-toplevel
  if in_process:
    from nsmae_jax import train
    from nsmae_jax.pretrain import pretrain_task
    if kind == 'pretrain':
      return train.train_and_evaluate(config, workdir, pretrain_task(config)).metrics
    if kind.startswith('evaluate:'):
      return evaluate_dropped(config, workdir, kind.split(':')[1])
    return _finetune_fn(kind.split(':')[1])(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  job = os.path.join(workdir, 'job.json')
  with open(job, 'w') as f:
    json.dump({'kind': kind, 'workdir': workdir, 'config': config.to_dict()}, f, indent=1)
  launch.run_entry_point('experiments.label_efficiency', [f'--run_cell={job}'], check=True)
  with open(os.path.join(workdir, 'job_result.json')) as f:
    return json.load(f)


class JobStopped(RuntimeError):
  """A pre-training or fine-tuning job stopped before its last step (SIGTERM): it is not
  finished, and re-running the grid resumes it from its checkpoint."""


def _check_finished(res: dict, workdir: str) -> None:
  if res.get('preempted_at_step') is not None:
    raise JobStopped(f'{workdir} was stopped at step {res["preempted_at_step"]} before its last '
                     'step (SIGTERM); nothing is marked done: re-run the same command to resume it')


def _run_cell_main(path: str) -> None:
  """Child process: runs the job of `path` and writes job_result.json next to it."""
  from nsmae_jax.config import Config  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    job = json.load(f)
  config = Config.from_dict(job['config'])
  data.enable_compilation_cache(config.train.compilation_cache_dir)
  res = _run_job(job['kind'], config, job['workdir'], in_process=True)
  with open(os.path.join(job['workdir'], 'job_result.json'), 'w') as f:
    json.dump({k: v for k, v in res.items() if isinstance(v, (int, float))}, f, indent=1)


def run_grid(config, results_dir: str, fractions, seeds, *, inits=('scratch', 'pretrained'),
             ablations=(), ablation_fractions=(0.05,), pretrain_steps=0, finetune_steps=0,
             finetune_learning_rate=0.0, out_prefix='', tasks=('bevseg',), log=print,
             in_process: bool = False) -> list[dict]:
  """Runs every unfinished cell of the grid (pre-training first, then each task's cells);
  returns the CSV rows of the last task.

  Each job runs in a fresh Python process unless in_process (tests with fake training).
  `out_prefix` names the joint, unaugmented segmentation report; detection's adds `_det3d`,
  and the grid's variant adds report.variant_suffix(): `_<modality>` (--modalities),
  `_aug` (--augment), `_drop_<sensor>` (--drop_modality), e.g. <out_prefix>_det3d_aug.
  """
  cells = plan(fractions, seeds, inits, ablations, ablation_fractions)
  for ab in ablations:
    ablation_overrides(ab, config)  # an unknown name fails before anything runs
  for task in tasks:
    if task not in report.TASKS:
      raise ValueError(f'--tasks: unknown task {task!r}; known: {sorted(report.TASKS)}')
  drop = config.finetune.drop_modality
  if drop and config.finetune.modalities != report.JOINT:
    raise ConfigError(f'--drop_modality: removes a sensor from the joint grid\'s models; '
                      f'--modalities={config.finetune.modalities} has none to remove')
  # Pre-training is joint whatever the fine-tuning reads: every grid shares it.
  # Nor does it read the fine-tuning augmentation: a grid with --augment shares it too.
  pre_cfg = config.replace(num_train_steps=pretrain_steps or config.train.num_train_steps,
                           modalities=report.JOINT, drop_modality='', augment=False)
  for ab in ([] if drop else [''] * any(i != 'scratch' for i in inits) + list(ablations)):
    wd = pretrain_dir(results_dir, ab)
    cfg = pre_cfg.replace(workdir=wd, **ablation_overrides(ab, pre_cfg))
    check_same_settings(wd, cfg)
    if os.path.exists(os.path.join(wd, 'done.json')):
      continue
    log(f'== pre-training {ab or "(full NS-MAE)"} -> {wd}')
    t0 = time.time()
    res = _run_job('pretrain', cfg, wd, in_process)
    _check_finished(res, wd)
    with open(os.path.join(wd, 'done.json'), 'w') as f:
      json.dump(dict(res, wall_s=time.time() - t0), f, indent=1)
  ft_cfg = config.replace(
      num_train_steps=finetune_steps or config.train.num_train_steps, eval_batches=0,
      learning_rate=finetune_learning_rate or config.train.learning_rate, drop_modality='')
  mods, aug = config.finetune.modalities, config.finetune.augment
  rows = []
  for task in tasks:
    prefix = (out_prefix + report.TASKS[task].out_suffix + report.variant_suffix(mods, drop, aug)
              if out_prefix else report.default_out_prefix(results_dir, task, mods, drop, aug))
    if drop:
      rows = _drop_cells(ft_cfg, results_dir, cells, task, drop, prefix, log, in_process)
    else:
      rows = _run_cells(ft_cfg, results_dir, cells, task, prefix, log, in_process)
  return rows


def _cell_config(ft_cfg, results_dir: str, init: str, fraction: float, seed: int, task: str):
  """(workdir, config) of one fine-tuning cell (its variant: ft_cfg's modalities and
  augmentation)."""
  fc = ft_cfg.finetune
  wd = os.path.join(results_dir, report.cell_name(init, fraction, seed, task, fc.modalities,
                                                  fc.augment))
  ablation = init.split(':')[1] if ':' in init else ''
  init_wd = '' if init == 'scratch' else pretrain_dir(results_dir, ablation)
  return wd, ft_cfg.replace(workdir=wd, init_workdir=init_wd, label_fraction=fraction,
                            subset_seed=seed, seed=seed)


def _drop_cells(ft_cfg, results_dir: str, cells, task: str, drop: str, out_prefix: str, log,
                in_process: bool) -> list[dict]:
  """Evaluates every finished joint cell of `task` (of the augmented grid if ft_cfg augments)
  with the `drop` sensor removed, once (<cell>/drop_<drop>/result.json); rewrites the
  sensor-drop report after each."""
  aug = ft_cfg.finetune.augment
  for init, fraction, seed in cells:
    wd, cfg = _cell_config(ft_cfg, results_dir, init, fraction, seed, task)
    check_same_settings(wd, cfg)
    trained = report.result_path(wd)
    done = report.result_path(wd, drop)
    if not os.path.exists(trained):
      log(f'== {task} {init} fraction {fraction:g} seed {seed}: not fine-tuned yet ({wd}); '
          f'no {drop}-drop evaluation')
      continue
    if os.path.exists(done):
      continue
    log(f'== {task} {init} fraction {fraction:g} seed {seed}: evaluating without {drop}')
    t0 = time.time()
    # The segmentation evaluation writes nothing there: in process, no one else creates it.
    os.makedirs(os.path.dirname(done), exist_ok=True)
    res = _run_job(f'evaluate:{task}', cfg.replace(drop_modality=drop), os.path.dirname(done),
                   in_process)
    with open(trained) as f:
      saved = json.load(f)
    # The training's bookkeeping, so that the report reads the row like any other.
    res.update({k: saved[k] for k in ('train_frames', 'steps') if k in saved},
               eval_wall_s=time.time() - t0, wall_s=saved.get('wall_s', 0.0),
               drop_modality=drop)
    with open(done, 'w') as f:
      json.dump(res, f, indent=1)
    report.write_summary(report.collect(results_dir, cells, task, drop=drop, augment=aug),
                         out_prefix, task=task, drop=drop, augment=aug)
  rows = report.collect(results_dir, cells, task, drop=drop, augment=aug)
  report.write_summary(rows, out_prefix, task=task, drop=drop, augment=aug)
  return rows


def evaluate_dropped(config, workdir: str, task: str) -> dict:
  """Evaluates the fine-tuned cell config.train.workdir with config.finetune.drop_modality
  removed; what the evaluation writes (det3d results) goes under `workdir`. Returns the eval
  metrics prefixed 'eval_'."""
  # pylint: disable=import-outside-toplevel
  from nsmae_jax.finetune.task import bevseg_task, evaluate_checkpoint
  batches = None
  if task == 'det3d':
    from nsmae_jax.finetune.det3d import det3d_eval_batches, det3d_task
    task_obj, batches = det3d_task(config, workdir), det3d_eval_batches(config)
  else:
    task_obj = bevseg_task(config, workdir)
  summary = evaluate_checkpoint(config, config.train.workdir, task_obj, eval_batches_fn=batches)
  return {f'eval_{k}': v for k, v in summary.items()}


def _run_cells(ft_cfg, results_dir: str, cells, task: str, out_prefix: str, log,
               in_process: bool) -> list[dict]:
  """Runs the unfinished fine-tuning cells of one task; rewrites its report after each."""
  mods, aug = ft_cfg.finetune.modalities, ft_cfg.finetune.augment
  for init, fraction, seed in cells:
    wd, cfg = _cell_config(ft_cfg, results_dir, init, fraction, seed, task)
    check_same_settings(wd, cfg)
    if os.path.exists(os.path.join(wd, 'result.json')):
      continue
    log(f'== {task} {init} fraction {fraction:g} seed {seed} -> {wd}')
    t0 = time.time()
    res = _run_job(f'finetune:{task}', cfg, wd, in_process)
    _check_finished(res, wd)
    res['wall_s'] = time.time() - t0
    res['steps'] = cfg.train.num_train_steps
    with open(os.path.join(wd, 'result.json')) as f:
      saved = json.load(f)
    # Stored with the cell so that the report needs neither the config nor the dataset.
    saved.update(wall_s=res['wall_s'], steps=res['steps'],
                 train_frames=report.train_frames(cfg, fraction))
    with open(os.path.join(wd, 'result.json'), 'w') as f:
      json.dump(saved, f, indent=1)
    headline = ', '.join(f'{label} {100 * res.get(f"eval_{m}", float("nan")):.2f}'
                         for m, label in report.TASKS[task].headlines)
    log(f'   {headline} in {res["wall_s"]:.0f} s')
    report.write_summary(report.collect(results_dir, cells, task, mods, augment=aug),
                         out_prefix, task=task, modalities=mods, augment=aug)
  rows = report.collect(results_dir, cells, task, mods, augment=aug)
  report.write_summary(rows, out_prefix, task=task, modalities=mods, augment=aug)
  return rows


def main(argv):
  del argv
  if _RUN_CELL.value:
    _run_cell_main(_RUN_CELL.value)
    return
  results_dir = _RESULTS_DIR.value
  overrides = {}
  if not FLAGS['compilation_cache_dir'].present:  # the grid's cells share their own cache
    overrides['compilation_cache_dir'] = os.path.abspath(os.path.join(results_dir, 'xla_cache'))
  config = nsflags.config_from_flags(**overrides)
  data.ensure_data(config)  # generates/converts on first use; turns the compilation cache on
  t0 = time.time()
  try:
    rows = run_grid(config, results_dir, [float(f) for f in _FRACTIONS.value],
                    [int(s) for s in _SEEDS.value], inits=tuple(_INITS.value),
                    ablations=tuple(_ABLATIONS.value),
                    ablation_fractions=[float(f) for f in _ABLATION_FRACTIONS.value],
                    pretrain_steps=_PRETRAIN_STEPS.value, finetune_steps=_FINETUNE_STEPS.value,
                    finetune_learning_rate=_FINETUNE_LR.value, out_prefix=_OUT_PREFIX.value,
                    tasks=tuple(_TASKS.value))
  except JobStopped as e:
    print(f'stopped: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(f'{len(rows)} cells finished; this invocation took {time.time() - t0:.0f} s', flush=True)


if __name__ == '__main__':
  nsflags.adopt_into_main()
  nsflags.run(main)
