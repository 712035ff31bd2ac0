"""The Colab notebook: committed without outputs, only library calls, and it runs end to end."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'notebooks', 'nsmae_colab.ipynb')
sys.path.insert(0, os.path.join(ROOT, 'experiments', 'notebooks'))

# One figure per visual cell (the loss curves are saved by the training cells).
FIGURES = ('sample_cameras_lidar', 'sample_bev_map', 'pretrain_loss', 'rendered_vs_target',
           'finetune_loss', 'bevseg_predicted_vs_true')


def _code_cells():
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb, [c for c in nb.cells if c.cell_type == 'code']


def test_committed_notebook_has_no_outputs_and_defines_no_functions():
  nb, cells = _code_cells()
  assert nb.metadata.kernelspec.name == 'python3'
  for cell in cells:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    # Logic lives in the library: cells call it (a one-line lambda is the only closure).
    assert '\ndef ' not in '\n' + cell.source and 'class ' not in cell.source, cell.source[:80]
  source = '\n'.join(c.source for c in cells)
  for call in ('generate(', 'convert(', 'train.train_and_evaluate(config, PRETRAIN_DIR, pretrain,',
               'train.train_and_evaluate(ft_config, FINETUNE_DIR, ft_task,', 'pretrain_task(',
               'losses.render_views(', 'checkpointing.Checkpointer(', 'restore_subtree(',
               'bevseg_task('):
    assert call in source, call
  for name in FIGURES:
    assert f"'{name}'" in source, name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_notebook_runs_every_cell_on_cpu_and_saves_each_figure(tmp_path):
  """The whole notebook, tiny preset, 2 emulated devices. Measured on the 2-core dev machine
  under other load: 404 s of cells (pre-training 198 s, fine-tuning 135 s, mostly compilation);
  the timeouts leave room for a busier machine."""
  from run_notebook import execute  # pylint: disable=import-outside-toplevel
  figures = tmp_path / 'figures'
  nb = execute(NOTEBOOK, preset='tiny', root=str(tmp_path / 'root'), figures=str(figures),
               output=str(tmp_path / 'executed.ipynb'),   # raises on the first failing cell
               timeout_per_cell=900)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count is not None for c in code)
  assert not [o for c in code for o in c.outputs if o.output_type == 'error']
  assert sorted(os.listdir(figures)) == sorted(f'{n}.png' for n in FIGURES)
  for name in FIGURES:
    with open(figures / f'{name}.png', 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000, name
  # The visual cells displayed their figure; the live plots drew at least once.
  images = [c for c in code if any('image/png' in o.get('data', {}) for o in c.outputs)]
  assert len(images) == len(FIGURES)
  text = '\n'.join(o.get('text', '') for c in code for o in c.outputs)
  assert 'cpu: 2 local device(s)' in text            # conftest's two emulated devices: pmap
  assert 'params equal the trained ones' in text
  assert 'mIoU' in text
