r"""Where a detection grid's NDS comes from: re-scores finished det3d cells with the devkit.

  python -m experiments.det3d_diagnose --results_dirs=runs/label_efficiency_cpu \
      --out_prefix=docs/det3d_diagnosis

NDS = (5 mAP + sum over the five TP errors of (1 - min(1, err))) / 10. On a protocol whose input
carries no motion (one LiDAR sweep, one camera frame) the velocity error measures the head's
unconstrained guess, and a BEV grid smaller than the devkit's 40-50 m class ranges hides part
of the ground truth from both columns alike. For every finished det3d cell (a workdir holding
det3d/results.json, result.json and config.json) this scores, with nuscenes-devkit's
DetectionEval on the same val split:
  official       the cell's own result (not re-scored);
  zero_velocity  every velocity set to 0 (attributes chosen for standing objects);
  in_range       every class range capped at the BEV half extent (what the grid can see);
  in_range_zero_velocity  both.
Cells group by name without the seed (`<group>_s<seed>`): the markdown table gives the mean and
sample std of NDS and mAP per variant, and the official NDS split into its six parts (x10, so
the parts sum to 10 x NDS). Re-scores are cached in <cell>/diagnose/<variant>/.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import sys

from absl import app
from absl import flags

from nsmae_jax.finetune.det3d import nusc

_RESULTS_DIRS = flags.DEFINE_list('results_dirs', [], 'Directories whose det3d cells (direct '
                                  'subdirectories) are scored.')
_OUT_PREFIX = flags.DEFINE_string('out_prefix', 'docs/det3d_diagnosis',
                                  'Writes <prefix>.csv (one row per cell) and <prefix>.md.')
_MAX_RANGE = flags.DEFINE_float('max_range', 0.0, 'Range cap (m) of in_range; 0 = each cell\'s '
                                '--bev_half_extent.')

VARIANTS = ('official', 'zero_velocity', 'in_range', 'in_range_zero_velocity')
_TP = ('mate', 'mase', 'maoe', 'mave', 'maae')


def find_cells(results_dirs) -> list[str]:
  """Finished det3d cells (workdirs) under each of results_dirs, sorted."""
  cells = []
  for root in results_dirs:
    if not os.path.isdir(root):
      raise FileNotFoundError(f'--results_dirs: {root} is not a directory')
    for name in sorted(os.listdir(root)):
      wd = os.path.join(root, name)
      if all(os.path.exists(os.path.join(wd, p)) for p in
             ('det3d/results.json', 'result.json', 'config.json')):
        cells.append(wd)
  return cells


def nds_parts(m: dict) -> dict[str, float]:
  """The six additive parts of 10 x NDS: 5 mAP and 1 - min(1, err) per TP error."""
  parts = {'5map': 5.0 * m['map']}
  parts.update({f'1-{k}': 1.0 - min(1.0, m[k]) for k in _TP})
  return parts


def score_cell(wd: str, max_range: float = 0.0) -> dict[str, dict[str, float]]:
  """{variant: flat metrics} of one cell (re-scores cached under <wd>/diagnose)."""
  with open(os.path.join(wd, 'config.json')) as f:
    cfg = json.load(f)
  with open(os.path.join(wd, 'result.json')) as f:
    official = {k[len('eval_'):]: v for k, v in json.load(f).items() if k.startswith('eval_')}
  if 'nds' not in official:
    raise ValueError(f'{wd}/result.json: no eval_nds (not a det3d cell?)')
  data = cfg['data']
  cap = max_range or float(data['bev_half_extent'])
  results = os.path.join(wd, 'det3d', 'results.json')
  out = {'official': official}
  for variant in VARIANTS[1:]:
    vdir = os.path.join(wd, 'diagnose', variant)
    summary = os.path.join(vdir, 'metrics_summary.json')
    if os.path.exists(summary):
      with open(summary) as f:
        out[variant] = nusc.summarize(json.load(f))
      continue
    path = results
    if variant.endswith('zero_velocity'):
      path = nusc.zero_velocity_results(results, os.path.join(vdir, 'results.json'))
    out[variant] = nusc.evaluate(path, data['dataroot'], data['version'],
                                 cfg['detection']['det_eval_set'], vdir,
                                 max_range=cap if variant.startswith('in_range') else None)
  return out


def _mean_std(values) -> str:
  values = [100.0 * v for v in values]
  if len(values) < 2:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}'


def write_report(rows: list[dict], out_prefix: str, command: str) -> None:
  """rows: one per cell (group, seed, cell, <variant>_nds/_map, parts) -> CSV and markdown."""
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  keys = list(rows[0])
  with open(out_prefix + '.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r['group'], []).append(r)
  lines = ['# Detection NDS, where it comes from (nuscenes-devkit DetectionEval, re-scored)', '',
           f'`{command}`', '',
           'NDS and mAP in %, mean +- sample std over seeds (n). official = the cell as scored in '
           'training; zero_velocity = every predicted velocity 0; in_range = class ranges capped '
           'at the BEV half extent; see experiments/det3d_diagnose.py.', '',
           '| cells | n | ' + ' | '.join(f'NDS {v}' for v in VARIANTS) +
           ' | mAP official | mAP in_range |',
           '|---|---|' + '---|' * (len(VARIANTS) + 2)]
  for g, rs in groups.items():
    lines.append(f'| {g} | {len(rs)} | ' + ' | '.join(
        _mean_std([r[f'{v}_nds'] for r in rs]) for v in VARIANTS) +
                 f' | {_mean_std([r["official_map"] for r in rs])}'
                 f' | {_mean_std([r["in_range_map"] for r in rs])} |')
  part_keys = [k for k in keys if k.startswith('part_')]
  lines += ['', 'The official NDS in parts (mean over seeds; the parts sum to 10 x NDS):', '',
            '| cells | ' + ' | '.join(k[len('part_'):] for k in part_keys) + ' |',
            '|---|' + '---|' * len(part_keys)]
  for g, rs in groups.items():
    lines.append(f'| {g} | ' + ' | '.join(
        f'{statistics.mean(r[k] for r in rs):.3f}' for k in part_keys) + ' |')
  with open(out_prefix + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv):
  del argv
  if not _RESULTS_DIRS.value:
    raise app.UsageError('--results_dirs: give at least one directory of det3d cells')
  cells = find_cells(_RESULTS_DIRS.value)
  if not cells:
    raise app.UsageError(f'--results_dirs={",".join(_RESULTS_DIRS.value)}: no finished det3d '
                         'cell (det3d/results.json + result.json + config.json) found')
  rows = []
  for wd in cells:
    name = os.path.basename(wd)
    m = re.match(r'(.*)_s(\d+)$', name)
    group, seed = (m.group(1), int(m.group(2))) if m else (name, -1)
    scores = score_cell(wd, _MAX_RANGE.value)
    row = {'group': group, 'seed': seed, 'cell': wd}
    for v in VARIANTS:
      row[f'{v}_nds'], row[f'{v}_map'] = scores[v]['nds'], scores[v]['map']
      row[f'{v}_mave'] = scores[v]['mave']
    row.update({f'part_{k}': x for k, x in nds_parts(scores['official']).items()})
    rows.append(row)
    print(f'{wd}: ' + ', '.join(f'{v} NDS {100 * scores[v]["nds"]:.2f}' for v in VARIANTS),
          flush=True)
  write_report(rows, _OUT_PREFIX.value, 'python -m experiments.det3d_diagnose ' +
               ' '.join(sys.argv[1:]))
  print(f'wrote {_OUT_PREFIX.value}.csv and .md')


if __name__ == '__main__':
  app.run(main)
