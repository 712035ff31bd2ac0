r"""The label-efficiency report: finished grid cells -> CSV, markdown table and plot.

  python -m experiments.label_efficiency_report --results_dir=runs/label_efficiency_cpu \
      --out_prefix=docs/label_efficiency_cpu

Reads the results directory that the grid runner (experiments.label_efficiency) fills, one
<results_dir>/ft_<init>_f<fraction>_s<seed>/result.json per finished fine-tuning cell, and writes
<out_prefix>.csv (one row per cell, per-class IoU), <out_prefix>.md (mean +- std over seeds per
fraction, and the gain) and <out_prefix>.png (mIoU vs label fraction with the seed spread). The
runner rewrites the report after every cell; run this module alone to rewrite it from an existing
results directory (e.g. after editing the format), without JAX or a training.

This module owns the results directory's cell naming, so the runner imports it and not the other
way round.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re

from nsmae_jax.config import Config
from nsmae_jax.data import schema
from nsmae_jax.data import subsets

CSV_FIELDS = ['init', 'fraction', 'seed', 'miou', *schema.MAP_CLASSES, 'train_frames', 'steps',
              'wall_s']

# ft_<init>_f<fraction>_s<seed>; an ablation init 'pretrained:<ablation>' is written with '-'
# because ':' is not portable in file names.
_CELL_DIR = re.compile(r'ft_(?P<init>.+)_f(?P<fraction>[^_]+)_s(?P<seed>\d+)')


def cell_name(init: str, fraction: float, seed: int) -> str:
  """The directory name of a fine-tuning cell under the results directory."""
  return f'ft_{init.replace(":", "-")}_f{fraction:g}_s{seed}'


def _init_rank(init: str) -> tuple[bool, str]:
  # Scratch first: it is the baseline every other column is read against.
  return init != 'scratch', init


def find_cells(results_dir: str) -> list[tuple[str, float, int]]:
  """(init, fraction, seed) of every cell directory under `results_dir`, in the runner's plan
  order: seed-major (seed, fraction, scratch before pre-trained), ablation cells last."""
  cells = []
  for name in os.listdir(results_dir) if os.path.isdir(results_dir) else []:
    m = _CELL_DIR.fullmatch(name)
    if m and os.path.isdir(os.path.join(results_dir, name)):
      cells.append((m['init'].replace('-', ':'), float(m['fraction']), int(m['seed'])))
  return sorted(cells, key=lambda c: (':' in c[0], c[0] if ':' in c[0] else '', c[2], c[1],
                                      _init_rank(c[0])))


def train_frames(config, fraction: float) -> int | str:
  """Labelled training key frames of `config`'s dataset at `fraction`; '' when the converted
  dataset is not there."""
  # pylint: disable=import-outside-toplevel
  # Lazy: opening the split imports TensorFlow, which a report from stored counts never needs.
  from nsmae_jax.data.pipeline import open_split
  from nsmae_jax.data.shards import ShardIndex
  try:
    total = len(ShardIndex(open_split(config, 'train')[1]))
  except FileNotFoundError:
    return ''
  return subsets.subset_size(total, fraction)


def _saved_train_frames(workdir: str, fraction: float) -> int | str:
  """train_frames from the cell's saved config.json, for cells whose result.json predates the
  runner storing the count; '' when neither the config nor the dataset is there."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    return train_frames(Config.from_dict(json.load(f)), fraction)


def collect(results_dir: str, cells=None) -> list[dict]:
  """CSV rows of the finished cells (those with a result.json) among `cells` (default: every
  cell directory under `results_dir`, find_cells order)."""
  rows = []
  for init, fraction, seed in find_cells(results_dir) if cells is None else cells:
    workdir = os.path.join(results_dir, cell_name(init, fraction, seed))
    path = os.path.join(workdir, 'result.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    frames = r['train_frames'] if 'train_frames' in r else _saved_train_frames(workdir, fraction)
    row = dict(init=init, fraction=fraction, seed=seed, miou=r['eval_miou'],
               train_frames=frames, steps=r.get('steps', ''),
               wall_s=round(r.get('wall_s', 0.0), 1))
    row.update({c: r[f'eval_iou/{c}'] for c in schema.MAP_CLASSES})
    rows.append(row)
  return rows


def _stats(values):
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, min(values), max(values)


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
  inits = sorted({i for i, _ in groups}, key=_init_rank)
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
  for init in sorted({i for i, _ in groups}, key=_init_rank):
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


def default_out_prefix(results_dir: str) -> str:
  return os.path.join(results_dir, 'label_efficiency')


def _main() -> None:
  # Flags are defined only when this module is the program: the runner imports it and defines
  # its own --results_dir / --out_prefix.
  # pylint: disable=import-outside-toplevel
  from absl import app
  from absl import flags
  results_dir = flags.DEFINE_string('results_dir', None, 'The grid runner\'s results directory.',
                                    required=True)
  out_prefix = flags.DEFINE_string('out_prefix', '', 'Path prefix of the CSV/markdown/PNG '
                                   'summary (default <results_dir>/label_efficiency).')
  title = flags.DEFINE_string('title', '', 'Title of the markdown table and the plot (default: '
                              'the standard one).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected positional arguments {list(argv[1:])}')
    if not os.path.isdir(results_dir.value):
      raise app.UsageError(f'--results_dir: directory {results_dir.value!r} does not exist')
    rows = collect(results_dir.value)
    prefix = out_prefix.value or default_out_prefix(results_dir.value)
    write_summary(rows, prefix, title.value)
    print(f'{len(rows)} finished cells -> {prefix}.csv, .md, .png', flush=True)

  app.run(main)


if __name__ == '__main__':
  _main()
