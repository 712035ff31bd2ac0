"""A process that abandons open pipeline iterators (reader threads, worker processes) exits
promptly and cleanly, without an atexit hook or os._exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_process_with_open_iterators_exits(converted_data_dir, synthetic_dataroot):
  config = tiny_config(data_dir=converted_data_dir, dataroot=synthetic_dataroot)
  script = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      from helpers import tiny_config
      from nsmae_jax.data import pipeline
      config = tiny_config(data_dir={config.data.data_dir!r}, dataroot={synthetic_dataroot!r})
      iterators = [pipeline.make_train_iterator(config) for _ in range(2)]
      iterators.append(pipeline.make_train_iterator(config, num_workers=2))
      iterators.append(pipeline.make_eval_iterator(config))
      for it in iterators:
        next(it)
      print('batches read; tensorflow imported:', 'tensorflow' in sys.modules, flush=True)
  ''')
  # The tf.data pipeline this replaced hung here forever, in interpreter teardown.
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=240, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Decoding is NumPy-only, so neither this process nor grain's workers pay TF's import.
  assert 'batches read; tensorflow imported: False' in proc.stdout, proc.stdout
  # grain's workers are stopped before multiprocessing closes their queues: no errors from
  # teardown, and no shared memory left for the resource tracker to reclaim.
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert 'leaked' not in proc.stderr, proc.stderr[-2000:]
