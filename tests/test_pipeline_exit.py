"""A process that leaves pipeline iterators open must still exit (the atexit close)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_process_with_open_iterators_exits(converted_data_dir, synthetic_dataroot):
  config = tiny_config(data_dir=converted_data_dir, dataroot=synthetic_dataroot)
  script = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      from helpers import tiny_config
      from nsmae_jax.data import pipeline
      config = tiny_config(data_dir={config.data.data_dir!r}, dataroot={synthetic_dataroot!r})
      iterators = [pipeline.make_train_iterator(config) for _ in range(3)]
      for it in iterators:
        next(it)
      next(pipeline.make_eval_iterator(config))
      print('batches read', flush=True)
  ''')
  # Before the fix this process printed its line and then hung forever in interpreter teardown.
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=240, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'batches read' in proc.stdout
