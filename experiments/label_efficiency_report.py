r"""The label-efficiency report: finished grid cells -> CSV, markdown table and plot.

  python -m experiments.label_efficiency_report --results_dir=runs/label_efficiency_cpu \
      --out_prefix=docs/label_efficiency_cpu [--task=bevseg|det3d]

Reads the results directory that the grid runner (experiments.label_efficiency) fills, one
<results_dir>/<prefix>_<init>_f<fraction>_s<seed>/result.json per finished fine-tuning cell
(prefix `ft` for BEV map segmentation, `det3d` for 3D detection), and writes <out_prefix>.csv
(one row per cell: the headline metrics and the per-class scores), <out_prefix>.md (per headline
metric, mean +- std over seeds per fraction, and the gain) and <out_prefix>.png (headline vs
label fraction with the seed spread).

Single-modality grids (--modalities=camera or lidar) have their own cells, <prefix>-<modality>_...
(e.g. ft-camera_pretrained_f0.05_s0), and reports, <out_prefix>_<modality>.*; the joint grid's
names are unchanged, so neither can read the other's cells. A sensor-drop evaluation
(--drop_modality=camera|lidar) of the joint cells stores <cell>/drop_<sensor>/result.json and is
reported as <out_prefix>_drop_<sensor>.*, beside the single-modality reports. A grid fine-tuned
with --augment likewise has its own cells, <prefix>[-<modality>]-aug_... (e.g.
det3d-aug_scratch_f0.05_s1, ft-camera-aug_pretrained_f0.1_s0), and reports,
<out_prefix>[_<modality>]_aug[_drop_<sensor>].*. The runner rewrites the report after every cell;
run this module alone to rewrite it from an existing results directory (e.g. after editing the
format), without JAX or a training.

This module owns the results directory's cell naming, so the runner imports it and not the other
way round.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import textwrap

from nsmae_jax.config import Config
from nsmae_jax.data import schema
from nsmae_jax.data import subsets



@dataclasses.dataclass(frozen=True)
class TaskReport:
  """What the report shows of one downstream task's cells."""
  cell_prefix: str  # cell directories are <cell_prefix>_<init>_f<fraction>_s<seed>
  headlines: tuple[tuple[str, str], ...]  # (column = result key without 'eval_', label)
  classes: tuple[str, ...]  # per-class columns
  class_key: str  # result.json key of a class score, formatted with the class name
  title: str  # default title of a table (formatted with the headline's label)
  explanation: str  # the sentence under the title
  out_suffix: str  # default out prefix: <results_dir>/label_efficiency<out_suffix>

  @property
  def csv_fields(self) -> list[str]:
    return ['init', 'fraction', 'seed', *(h for h, _ in self.headlines), *self.classes,
            'train_frames', 'steps', 'wall_s']


_PAIRED = ('gain = pre-trained mean - scratch mean; per seed: pre-trained - scratch of the same '
           'seed (same labelled subset, data order and head init).')
TASKS = {
    'bevseg': TaskReport(
        cell_prefix='ft', headlines=(('miou', 'mIoU'),), classes=schema.MAP_CLASSES,
        class_key='eval_iou/{}', title='Label efficiency (BEV map segmentation {}, %)',
        explanation='mIoU in % on the whole val split (BEVFusion metric: per class max IoU over '
                    'thresholds 0.35..0.65), mean +- sample std over seeds (n = seeds '
                    'finished); ' + _PAIRED, out_suffix=''),
    'det3d': TaskReport(
        cell_prefix='det3d', headlines=(('nds', 'NDS'), ('map', 'mAP')),
        classes=schema.DETECTION_CLASSES, class_key='eval_ap_{}',
        title='Label efficiency (3D detection {}, %)',
        explanation='{} in % on the whole val split, scored by nuscenes-devkit DetectionEval '
                    '(detection_cvpr_2019), mean +- sample std over seeds (n = seeds finished); '
                    + _PAIRED + ' Per-class columns of the CSV: AP.', out_suffix='_det3d'),
}
# The BEV segmentation report's columns (the first wave's CSV format).
CSV_FIELDS = TASKS['bevseg'].csv_fields


JOINT = 'camera,lidar'


def _cell_prefix(task: str, modalities: str, augment: bool = False) -> str:
  """ft / det3d for the joint model, ft-camera, det3d-lidar, ... for a single modality, then
  -aug for a grid fine-tuned with augmentation (ft-aug, ft-camera-aug): no variant's cell
  matches another variant's pattern."""
  return (TASKS[task].cell_prefix + ('' if modalities == JOINT else f'-{modalities}') +
          ('-aug' if augment else ''))


def _cell_dir(task: str, modalities: str = JOINT, augment: bool = False) -> re.Pattern:
  # <prefix>_<init>_f<fraction>_s<seed>; an ablation init 'pretrained:<ablation>' is written
  # with '-' because ':' is not portable in file names. Every variant's part of the prefix
  # starts with '-' and the prefix must be followed by '_', so ft_... never reads ft-aug_... or
  # ft-camera_..., and ft-camera_... never reads ft-camera-aug_...
  return re.compile(re.escape(_cell_prefix(task, modalities, augment)) +
                    r'_(?P<init>.+)_f(?P<fraction>[^_]+)_s(?P<seed>\d+)')


def cell_name(init: str, fraction: float, seed: int, task: str = 'bevseg',
              modalities: str = JOINT, augment: bool = False) -> str:
  """The directory name of a fine-tuning cell of `task` (with `modalities`, fine-tuned with
  augmentation if `augment`) under the results directory."""
  return (f'{_cell_prefix(task, modalities, augment)}_{init.replace(":", "-")}'
          f'_f{fraction:g}_s{seed}')


def result_path(cell_dir: str, drop: str = '') -> str:
  """A cell's result.json; with `drop` (camera or lidar) the sensor-drop evaluation's."""
  return os.path.join(cell_dir, f'drop_{drop}' if drop else '', 'result.json')


def variant_suffix(modalities: str = JOINT, drop: str = '', augment: bool = False) -> str:
  """What a report's name adds for a single-modality grid, an augmented grid and a sensor-drop
  evaluation (of the joint grid's cells), in this order: _camera_aug, _aug_drop_lidar."""
  return (('' if modalities == JOINT else f'_{modalities}') + ('_aug' if augment else '') +
          (f'_drop_{drop}' if drop else ''))


def _init_rank(init: str) -> tuple[bool, str]:
  # Scratch first: it is the baseline every other column is read against.
  return init != 'scratch', init


def find_cells(results_dir: str, task: str = 'bevseg', modalities: str = JOINT,
               augment: bool = False) -> list[tuple[str, float, int]]:
  """(init, fraction, seed) of every cell directory of `task` (with `modalities`, augmented or
  not) under `results_dir`, in the runner's plan order: seed-major (seed, fraction, scratch
  before pre-trained), ablation cells last."""
  cells = []
  pattern = _cell_dir(task, modalities, augment)
  for name in os.listdir(results_dir) if os.path.isdir(results_dir) else []:
    m = pattern.fullmatch(name)
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


def collect(results_dir: str, cells=None, task: str = 'bevseg', modalities: str = JOINT,
            drop: str = '', augment: bool = False) -> list[dict]:
  """CSV rows of the finished cells of `task` (those with a result.json) among `cells` (default:
  every cell directory of the task under `results_dir`, find_cells order); `modalities` and
  `augment` pick the grid, `drop` (camera or lidar) its sensor-drop evaluations instead of its
  results."""
  spec = TASKS[task]
  rows = []
  for init, fraction, seed in (find_cells(results_dir, task, modalities, augment)
                               if cells is None else cells):
    workdir = os.path.join(results_dir,
                           cell_name(init, fraction, seed, task, modalities, augment))
    path = result_path(workdir, drop)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    frames = r['train_frames'] if 'train_frames' in r else _saved_train_frames(workdir, fraction)
    row = dict(init=init, fraction=fraction, seed=seed,
               **{h: r[f'eval_{h}'] for h, _ in spec.headlines},
               train_frames=frames, steps=r.get('steps', ''),
               wall_s=round(r.get('wall_s', 0.0), 1))
    row.update({c: r[spec.class_key.format(c)] for c in spec.classes})
    rows.append(row)
  return rows


def _stats(values):
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, min(values), max(values)


def write_summary(rows: list[dict], out_prefix: str, title: str = '',
                  task: str = 'bevseg', modalities: str = JOINT, drop: str = '',
                  augment: bool = False) -> None:
  """Writes <out_prefix>.csv, .md and .png from the cell rows of `task` (partial grids too);
  the default title names a single modality (`modalities`), a dropped sensor (`drop`) and the
  fine-tuning augmentation (`augment`)."""
  spec = TASKS[task]
  what = []
  if modalities != JOINT:
    what.append(f'{modalities} only')
  if drop:
    what.append(f'joint model, {drop} removed at eval')
  if augment:
    what.append('fine-tuned with augmentation')
  if what:
    spec = dataclasses.replace(spec, title=spec.title[:-1] + f'; {", ".join(what)})')
  os.makedirs(os.path.dirname(out_prefix) or '.', exist_ok=True)
  fields = spec.csv_fields
  with open(out_prefix + '.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: (f'{r[k]:.6f}' if isinstance(r[k], float) and k != 'fraction' else r[k])
                  for k in fields})
  lines, groups = [], {}
  for metric, label in spec.headlines:
    if lines:
      lines.append('')
    lines += _table(rows, metric, label, spec, title)
    groups[metric] = _groups(rows, metric)[0]
  with open(out_prefix + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot(groups, spec, out_prefix + '.png', title)


def _groups(rows, metric):
  """{(init, fraction): [% per seed]} and {(init, fraction, seed): %} of one metric."""
  groups: dict[tuple[str, float], list[float]] = {}
  by_seed: dict[tuple[str, float, int], float] = {}
  for r in rows:
    groups.setdefault((r['init'], r['fraction']), []).append(100 * r[metric])
    by_seed[(r['init'], r['fraction'], r['seed'])] = 100 * r[metric]
  return groups, by_seed


def _table(rows, metric: str, label: str, spec: TaskReport, title: str) -> list[str]:
  """The markdown lines of one headline metric: title, explanation, one row per fraction."""
  groups, by_seed = _groups(rows, metric)
  fractions = sorted({f for _, f in groups})
  inits = sorted({i for i, _ in groups}, key=_init_rank)
  heading = f'{title} ({label})' if title and len(spec.headlines) > 1 else title
  lines = [f'# {heading}' if heading else '# ' + spec.title.format(label), '',
           spec.explanation.format(label), '',
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
  return lines


def _plot(groups: dict, spec: TaskReport, path: str, title: str) -> None:
  """One panel per headline metric: mean over seeds vs label fraction, band = min..max."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = len(spec.headlines)
  fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
  for ax, (metric, label) in zip(axes[0], spec.headlines):
    g = groups[metric]
    for init in sorted({i for i, _ in g}, key=_init_rank):
      frs = sorted(f for i, f in g if i == init)
      stats = [_stats(g[(init, f)]) for f in frs]
      xs = [100 * f for f in frs]
      line, = ax.plot(xs, [s[0] for s in stats], marker='o', label=init)
      colour = line.get_color()  # band and seed dots in the line's colour
      ax.fill_between(xs, [s[2] for s in stats], [s[3] for s in stats], alpha=0.2, color=colour)
      for f in frs:
        ax.scatter([100 * f] * len(g[(init, f)]), g[(init, f)], s=8, alpha=0.6, color=colour)
    ax.set_xscale('log')
    ticks = sorted({100 * f for _, f in g})
    ax.set_xticks(ticks, [f'{t:g}%' for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('label fraction (% of training key frames)')
    ax.set_ylabel(f'{label} (%)')
    default = spec.title.format(label).replace('Label efficiency (', '').rstrip(')')
    ax.set_title(textwrap.fill(title or f'{default}: mean over seeds, band = min..max', 60),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def default_out_prefix(results_dir: str, task: str = 'bevseg', modalities: str = JOINT,
                       drop: str = '', augment: bool = False) -> str:
  return os.path.join(results_dir, 'label_efficiency' + TASKS[task].out_suffix +
                      variant_suffix(modalities, drop, augment))


def _main() -> None:
  # Flags are defined only when this module is the program: the runner imports it and defines
  # its own --results_dir / --out_prefix.
  # pylint: disable=import-outside-toplevel
  from absl import app
  from absl import flags
  results_dir = flags.DEFINE_string('results_dir', None, 'The grid runner\'s results directory.',
                                    required=True)
  out_prefix = flags.DEFINE_string('out_prefix', '', 'Path prefix of the CSV/markdown/PNG '
                                   'summary (default <results_dir>/label_efficiency[_det3d]).')
  title = flags.DEFINE_string('title', '', 'Title of the markdown table and the plot (default: '
                              'the standard one).')
  task = flags.DEFINE_enum('task', 'bevseg', sorted(TASKS), 'Which downstream task\'s cells to '
                           'report (bevseg: mIoU; det3d: NDS and mAP).')
  modalities = flags.DEFINE_enum('modalities', JOINT, [JOINT, 'camera', 'lidar'],
                                 'Which grid: the joint one or a single-modality one.')
  drop = flags.DEFINE_enum('drop_modality', '', ['', 'camera', 'lidar'], 'Report the joint '
                           'cells\' evaluations with this sensor removed instead.')
  augment = flags.DEFINE_bool('augment', False, 'Report the grid fine-tuned with augmentation '
                              '(cells <prefix>-aug_..., reports ..._aug.*).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected positional arguments {list(argv[1:])}')
    if not os.path.isdir(results_dir.value):
      raise app.UsageError(f'--results_dir: directory {results_dir.value!r} does not exist')
    if drop.value and modalities.value != JOINT:
      raise app.UsageError(f'--drop_modality={drop.value}: only the joint grid\'s cells are '
                           f'evaluated with a sensor removed; --modalities={modalities.value} '
                           f'has none to remove (the runner refuses the same combination)')
    rows = collect(results_dir.value, task=task.value, modalities=modalities.value,
                   drop=drop.value, augment=augment.value)
    prefix = out_prefix.value or default_out_prefix(results_dir.value, task.value,
                                                    modalities.value, drop.value, augment.value)
    write_summary(rows, prefix, title.value, task.value, modalities.value, drop.value,
                  augment.value)
    print(f'{len(rows)} finished cells -> {prefix}.csv, .md, .png', flush=True)

  app.run(main)


if __name__ == '__main__':
  _main()
