r"""Executes a notebook headless with nbclient; exits non-zero if any cell raises.

  python experiments/notebooks/run_notebook.py --preset=tiny              # what CI runs
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  python experiments/notebooks/run_notebook.py --preset=cpu --figures=docs/notebook \
      --root=runs/notebook_cpu --output=/tmp/nsmae_colab_executed.ipynb   # the docs figures

Parameters reach the notebook through environment variables that its parameters cell reads
(NSMAE_NOTEBOOK_PRESET, NSMAE_NOTEBOOK_ROOT, NSMAE_NOTEBOOK_FIGURES); the kernel inherits this
process' environment (XLA_FLAGS included, so emulated CPU devices exercise pmap). The kernel runs
in the repository root with this interpreter (the `python3` kernel spec resolves to
sys.executable). The committed notebook carries no outputs; the executed copy is written only
where --output says.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nsmae_colab.ipynb')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def execute(notebook: str = NOTEBOOK, *, preset: str = 'tiny', root: str = '',
            figures: str = '', output: str = '', timeout_per_cell: int = 600,
            cwd: str = REPO_ROOT):
  """Runs every cell of `notebook` in a fresh python3 kernel; returns the executed notebook.

  Raises nbclient.exceptions.CellExecutionError naming the failing cell when one raises.
  """
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = nbformat.read(notebook, as_version=4)
  env = {'NSMAE_NOTEBOOK_PRESET': preset}
  if root:
    env['NSMAE_NOTEBOOK_ROOT'] = os.path.abspath(root)
  if figures:
    env['NSMAE_NOTEBOOK_FIGURES'] = os.path.abspath(figures)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel is started with a copy of this environment
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout_per_cell, kernel_name='python3',
                                     resources={'metadata': {'path': cwd}})
    try:
      client.execute()
    finally:
      if output:
        nbformat.write(nb, output)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--notebook', default=NOTEBOOK)
  parser.add_argument('--preset', default='tiny', help='tiny (CI) | cpu | demo')
  parser.add_argument('--root', default='', help='data and run dir (default: the notebook\'s)')
  parser.add_argument('--figures', default='', help='save every figure here as <name>.png')
  parser.add_argument('--output', default='', help='write the executed notebook here')
  parser.add_argument('--timeout_per_cell', type=int, default=600)
  args = parser.parse_args(argv)
  start = time.time()
  execute(args.notebook, preset=args.preset, root=args.root, figures=args.figures,
          output=args.output, timeout_per_cell=args.timeout_per_cell)
  print(f'executed {args.notebook} (preset {args.preset}) in {time.time() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
