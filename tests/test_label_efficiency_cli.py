"""The grid runner's entry point from an empty data dir, as a user starts it: the dataset is
converted (like every entry point does) before the grid's first job needs it."""

from __future__ import annotations

import os

import pytest

from helpers import tiny_config


@pytest.mark.slow  # converts the tiny world (a subprocess)
def test_grid_command_prepares_the_data_before_the_grid(synthetic_dataroot, tmp_path,
                                                        monkeypatch):
  # pylint: disable=import-outside-toplevel
  from experiments import flags as nsflags
  from experiments import label_efficiency
  c = tiny_config()
  values = {k: getattr(c.data, k) for k in ('image_height', 'image_width', 'max_points',
                                           'max_boxes', 'bev_half_extent', 'bev_resolution',
                                           'num_sweeps')}
  data_dir, results = tmp_path / 'tfds', tmp_path / 'grid'
  seen = {}

  def run_grid(config, results_dir, *args, **kwargs):  # the grid itself is tested elsewhere
    del args, kwargs
    seen.update(results_dir=results_dir, config=config,
                converted=sorted(p.name for p in data_dir.glob('nuscenes_nsmae/*/1.0.0/*')))
    return []

  monkeypatch.setattr(label_efficiency, 'run_grid', run_grid)
  nsflags.FLAGS.unparse_flags()
  nsflags.FLAGS(['prog', *[f'--{k}={v}' for k, v in values.items()],
                 f'--dataroot={synthetic_dataroot}', '--version=v1.0-trainval',
                 f'--data_dir={data_dir}', f'--results_dir={results}', '--convert_workers=1'])
  try:
    assert not data_dir.exists()
    label_efficiency.main([])
  finally:
    nsflags.FLAGS.unparse_flags()
  assert seen['results_dir'] == str(results)
  assert any(n.endswith('.tfrecord-00000-of-00001') or 'tfrecord' in n
             for n in seen['converted']), seen['converted']
  # The cells share one persistent compilation cache under the results dir.
  assert seen['config'].train.compilation_cache_dir == os.path.abspath(results / 'xla_cache')
