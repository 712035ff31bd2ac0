r"""The label-efficiency grid: {scratch, pre-trained} x label fractions x seeds (+ ablations).

  python -m experiments.label_efficiency \
      --flagfile=experiments/configs/label_efficiency_cpu.flags

Pre-training runs first, once (<results_dir>/pretrain); then every fine-tuning cell
(<results_dir>/ft_<init>_f<fraction>_s<seed>) with the same number of steps at every fraction.
A cell whose result.json exists is skipped and an interrupted cell resumes from its checkpoint,
so re-running the command continues the grid. After every cell the summary is rewritten:
<out_prefix>.csv (one row per cell), <out_prefix>.md (mean +- std over seeds per fraction, and
the gain) and <out_prefix>.png (mIoU vs label fraction with the seed spread).

Ablations (--ablations=no_bev,no_perspective,no_depth,no_color,no_mask) pre-train once more
with that view / loss / masking switched off and fine-tune at --ablation_fraction for every seed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time

from absl import flags

from experiments import flags as nsflags

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
_ABLATIONS = flags.DEFINE_list('ablations', [], 'Pre-training ablations to fine-tune at '
                               '--ablation_fraction: ' + ', '.join(
                                   ['no_bev', 'no_perspective', 'no_depth', 'no_color',
                                    'no_mask']))
_ABLATION_FRACTION = flags.DEFINE_float('ablation_fraction', 0.05,
                                        'The label fraction of the ablation cells.')
_RUN_CELL = flags.DEFINE_string('run_cell', '', 'Internal: run the one job described by this '
                                'JSON file (a fresh process per cell) and exit.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', '', 'Persistent XLA compilation cache dir shared by the cells (every '
    'cell compiles the same program); empty = <results_dir>/xla_cache, "none" = off.')

# Config overrides that switch one part of pre-training off.
ABLATIONS = {
    'no_bev': dict(bev_color_weight=0.0, bev_depth_weight=0.0),
    'no_perspective': dict(perspective_color_weight=0.0, perspective_depth_weight=0.0),
    'no_depth': dict(bev_depth_weight=0.0, perspective_depth_weight=0.0),
    'no_color': dict(bev_color_weight=0.0, perspective_color_weight=0.0),
    'no_mask': dict(image_mask_ratio=0.0, lidar_mask_ratio=0.0),
}
CSV_FIELDS = ['init', 'fraction', 'seed', 'miou', 'drivable_area', 'ped_crossing', 'walkway',
              'stop_line', 'carpark_area', 'divider', 'train_frames', 'steps', 'wall_s']


def cell_name(init: str, fraction: float, seed: int) -> str:
  return f'ft_{init}_f{fraction:g}_s{seed}'


def plan(fractions, seeds, inits=('scratch', 'pretrained'), ablations=(),
         ablation_fraction=0.05) -> list[tuple[str, float, int]]:
  """(init, fraction, seed) of every cell, seed-major so a partial grid has whole seeds; init
  is 'scratch', 'pretrained' or 'pretrained:<ablation>'."""
  cells = [(init, f, s) for s in seeds for f in fractions for init in inits]
  cells += [(f'pretrained:{a}', ablation_fraction, s) for a in ablations for s in seeds]
  return cells


def pretrain_dir(results_dir: str, ablation: str = '') -> str:
  return os.path.join(results_dir, 'pretrain' + (f'_{ablation}' if ablation else ''))


def _stats(values):
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, min(values), max(values)


def train_frames(config, fraction: float) -> int | str:
  """Labelled training key frames at `fraction` (the pipeline keeps max(1, round(f N)));
  '' when the converted dataset is not there."""
  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.shards import ShardIndex
  from nsmae_jax.data.pipeline import open_split
  try:
    total = len(ShardIndex(open_split(config, 'train')[1]))
  except FileNotFoundError:
    return ''
  return total if fraction >= 1.0 else max(1, int(round(fraction * total)))


def collect(results_dir: str, cells, config=None) -> list[dict]:
  """CSV rows of the finished cells (those with a result.json)."""
  from nsmae_jax.finetune.metrics import MAP_CLASSES  # pylint: disable=import-outside-toplevel
  rows = []
  for init, fraction, seed in cells:
    path = os.path.join(results_dir, cell_name(init.replace(':', '-'), fraction, seed),
                        'result.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    row = dict(init=init, fraction=fraction, seed=seed, miou=r['eval_miou'],
               train_frames=r.get('train_frames', '') if config is None else train_frames(
                   config, fraction), steps=r.get('steps', ''),
               wall_s=round(r.get('wall_s', 0.0), 1))
    row.update({c: r[f'eval_iou/{c}'] for c in MAP_CLASSES})
    rows.append(row)
  return rows


def write_summary(rows: list[dict], out_prefix: str, title: str = '') -> None:
  """Writes <out_prefix>.csv, .md and .png from the cell rows (partial grids too)."""
  os.makedirs(os.path.dirname(out_prefix) or '.', exist_ok=True)
  with open(out_prefix + '.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
      w.writerow({k: (f'{r[k]:.6f}' if isinstance(r[k], float) and k != 'fraction' else r[k])
                  for k in CSV_FIELDS})
  groups: dict[tuple[str, float], list[float]] = {}
  by_seed: dict[tuple[str, float, int], float] = {}
  for r in rows:
    groups.setdefault((r['init'], r['fraction']), []).append(100 * r['miou'])
    by_seed[(r['init'], r['fraction'], r['seed'])] = 100 * r['miou']
  fractions = sorted({f for _, f in groups})
  inits = sorted({i for i, _ in groups}, key=lambda i: (i != 'scratch', i))
  lines = [f'# {title}' if title else '# Label efficiency (BEV map segmentation mIoU, %)', '',
           'mIoU in % on the whole val split (BEVFusion metric: per class max IoU over thresholds '
           '0.35..0.65), mean +- sample std over seeds (n = seeds finished); gain = pre-trained '
           'mean - scratch mean; per seed: pre-trained - scratch of the same seed (same labelled '
           'subset, data order and head init).', '',
           '| label fraction | ' + ' | '.join(inits) + ' | gain (pre-trained - scratch) | '
           'gain per seed |',
           '|---' * (len(inits) + 3) + '|']
  for fr in fractions:
    cells = []
    for init in inits:
      v = groups.get((init, fr))
      if v:
        mean, std, _, _ = _stats(v)
        cells.append(f'{mean:.2f} +- {std:.2f} (n={len(v)})')
      else:
        cells.append('not run')
    s, p = groups.get(('scratch', fr)), groups.get(('pretrained', fr))
    gain = f'{_stats(p)[0] - _stats(s)[0]:+.2f}' if s and p else 'n/a'
    seeds = sorted({sd for i, f, sd in by_seed if f == fr})
    paired = ', '.join(f'{by_seed[("pretrained", fr, sd)] - by_seed[("scratch", fr, sd)]:+.2f}'
                       for sd in seeds if ('pretrained', fr, sd) in by_seed
                       and ('scratch', fr, sd) in by_seed) or 'n/a'
    lines.append(f'| {100 * fr:g}% | ' + ' | '.join(cells) + f' | {gain} | {paired} |')
  with open(out_prefix + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot(groups, out_prefix + '.png', title)


def _plot(groups, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for init in sorted({i for i, _ in groups}, key=lambda i: (i != 'scratch', i)):
    frs = sorted(f for i, f in groups if i == init)
    stats = [_stats(groups[(init, f)]) for f in frs]
    xs = [100 * f for f in frs]
    means = [s[0] for s in stats]
    ax.plot(xs, means, marker='o', label=init)
    ax.fill_between(xs, [s[2] for s in stats], [s[3] for s in stats], alpha=0.2)
    for f in frs:
      ax.scatter([100 * f] * len(groups[(init, f)]), groups[(init, f)], s=8, alpha=0.6)
  ax.set_xscale('log')
  ax.set_xlabel('label fraction (% of training key frames)')
  ax.set_ylabel('mIoU (%)')
  ax.set_title(title or 'BEV map segmentation: mean over seeds, band = min..max')
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _enable_compilation_cache(directory: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


# Settings that do not change a job's result: a finished job run with other values still counts.
_BOOKKEEPING = {'workdir', 'log_every_steps', 'checkpoint_every_steps', 'image_every_steps',
                'max_to_keep', 'convert_workers'}


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


def _run_job(kind: str, config, workdir: str, in_process: bool) -> dict:
  """Runs one pre-training ('pretrain') or fine-tuning ('finetune') job; returns its metrics.

  Out of process by default: XLA:CPU never unmaps the code of executables it loaded, so two
  dozen runs in one process ran out of memory mappings ("LLVM ERROR: Unable to allocate section
  memory") after 14 cells. A fresh process per cell costs a few seconds of imports; the
  persistent compilation cache still spares the compiles.
  """
  # pylint: disable=import-outside-toplevel
  if in_process:
    from experiments import finetune_bevseg
    from nsmae_jax import train
    from nsmae_jax.pretrain import pretrain_task
    if kind == 'pretrain':
      return train.train_and_evaluate(config, workdir, pretrain_task(config)).metrics
    return finetune_bevseg.finetune(config, workdir)
  import subprocess
  import sys
  os.makedirs(workdir, exist_ok=True)
  job = os.path.join(workdir, 'job.json')
  with open(job, 'w') as f:
    json.dump({'kind': kind, 'workdir': workdir, 'config': config.to_dict(),
               'compilation_cache': _cache_dir_value()}, f, indent=1)
  subprocess.run([sys.executable, '-m', 'experiments.label_efficiency', f'--run_cell={job}'],
                 check=True)
  with open(os.path.join(workdir, 'job_result.json')) as f:
    return json.load(f)


def _cache_dir_value() -> str:
  try:
    return _COMPILATION_CACHE.value
  except flags.UnparsedFlagAccessError:
    return 'none'


def _run_cell_main(path: str) -> None:
  """Child process: runs the job of `path` and writes job_result.json next to it."""
  from nsmae_jax.config import Config  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    job = json.load(f)
  if job.get('compilation_cache', 'none') not in ('none', ''):
    _enable_compilation_cache(job['compilation_cache'])
  config = Config.from_dict(job['config'])
  res = _run_job(job['kind'], config, job['workdir'], in_process=True)
  with open(os.path.join(job['workdir'], 'job_result.json'), 'w') as f:
    json.dump({k: v for k, v in res.items() if isinstance(v, (int, float))}, f, indent=1)


def run_grid(config, results_dir: str, fractions, seeds, *, inits=('scratch', 'pretrained'),
             ablations=(), ablation_fraction=0.05, pretrain_steps=0, finetune_steps=0,
             finetune_learning_rate=0.0, out_prefix='', log=print,
             in_process: bool = False) -> list[dict]:
  """Runs every unfinished cell of the grid (pre-training first); returns the CSV rows.

  Each job runs in a fresh Python process unless in_process (tests with fake training).
  """
  out_prefix = out_prefix or os.path.join(results_dir, 'label_efficiency')
  cells = plan(fractions, seeds, inits, ablations, ablation_fraction)
  for ab in ablations:
    if ab not in ABLATIONS:
      raise ValueError(f'--ablations: unknown ablation {ab!r}; known: {sorted(ABLATIONS)}')
  pre_cfg = config.replace(num_train_steps=pretrain_steps or config.train.num_train_steps)
  for ab in [''] * any(i != 'scratch' for i in inits) + list(ablations):
    wd = pretrain_dir(results_dir, ab)
    cfg = pre_cfg.replace(workdir=wd, **ABLATIONS.get(ab, {}))
    check_same_settings(wd, cfg)
    if os.path.exists(os.path.join(wd, 'done.json')):
      continue
    log(f'== pre-training {ab or "(full NS-MAE)"} -> {wd}')
    t0 = time.time()
    res = _run_job('pretrain', cfg, wd, in_process)
    with open(os.path.join(wd, 'done.json'), 'w') as f:
      json.dump(dict(res, wall_s=time.time() - t0), f, indent=1)
  ft_cfg = config.replace(
      num_train_steps=finetune_steps or config.train.num_train_steps, eval_batches=0,
      learning_rate=finetune_learning_rate or config.train.learning_rate)
  for init, fraction, seed in cells:
    wd = os.path.join(results_dir, cell_name(init.replace(':', '-'), fraction, seed))
    ablation = init.split(':')[1] if ':' in init else ''
    init_wd = '' if init == 'scratch' else pretrain_dir(results_dir, ablation)
    cfg = ft_cfg.replace(workdir=wd, init_workdir=init_wd, label_fraction=fraction,
                         subset_seed=seed, seed=seed)
    check_same_settings(wd, cfg)
    if os.path.exists(os.path.join(wd, 'result.json')):
      continue
    log(f'== {init} fraction {fraction:g} seed {seed} -> {wd}')
    t0 = time.time()
    res = _run_job('finetune', cfg, wd, in_process)
    res['wall_s'] = time.time() - t0
    res['steps'] = cfg.train.num_train_steps
    with open(os.path.join(wd, 'result.json')) as f:
      saved = json.load(f)
    saved.update(wall_s=res['wall_s'], steps=res['steps'])
    with open(os.path.join(wd, 'result.json'), 'w') as f:
      json.dump(saved, f, indent=1)
    log(f'   mIoU {100 * res.get("eval_miou", float("nan")):.2f} in {res["wall_s"]:.0f} s')
    write_summary(collect(results_dir, cells, config), out_prefix)
  rows = collect(results_dir, cells, config)
  write_summary(rows, out_prefix)
  return rows


def main(argv):
  del argv
  if _RUN_CELL.value:
    _run_cell_main(_RUN_CELL.value)
    return
  config = nsflags.config_from_flags()
  results_dir = _RESULTS_DIR.value
  if _COMPILATION_CACHE.value == '':
    FLAGS.compilation_cache = os.path.abspath(os.path.join(results_dir, 'xla_cache'))
  t0 = time.time()
  rows = run_grid(config, results_dir, [float(f) for f in _FRACTIONS.value],
                  [int(s) for s in _SEEDS.value], inits=tuple(_INITS.value),
                  ablations=tuple(_ABLATIONS.value), ablation_fraction=_ABLATION_FRACTION.value,
                  pretrain_steps=_PRETRAIN_STEPS.value, finetune_steps=_FINETUNE_STEPS.value,
                  finetune_learning_rate=_FINETUNE_LR.value, out_prefix=_OUT_PREFIX.value)
  print(f'{len(rows)} cells finished; this invocation took {time.time() - t0:.0f} s', flush=True)


if __name__ == '__main__':
  nsflags.adopt_into_main()
  nsflags.run(main)
