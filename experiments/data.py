"""Data preparation for the entry points: the converted dataset exists before training starts.

The library never generates or converts data (nsmae_jax reads shards only); the entry points
call `ensure_data(config)` first (which also turns on the persistent compilation cache). In a
multi-process run process 0 prepares the data and the others wait for it.
"""

from __future__ import annotations

import os
from typing import Callable

from data_prep import prepare
from nsmae_jax.config import Config


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (empty = leave it off).

  Every program is cached, however fast it compiled: a rerun, a resumed run or the next cell
  of a grid then loads the train step instead of compiling it again.
  """
  if not directory:
    return
  import jax  # pylint: disable=import-outside-toplevel
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def ensure_data(config: Config, log: Callable[[str], None] = print) -> str:
  """Returns config.data.data_dir once its dataset exists (data_prep.prepare.ensure_dataset).

  Also turns on the persistent compilation cache of --compilation_cache_dir: every entry point
  that trains calls this first, before anything compiles.
  """
  import jax  # pylint: disable=import-outside-toplevel
  enable_compilation_cache(config.train.compilation_cache_dir)
  from nsmae_jax.train import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(config.train)
  if jax.process_index() == 0:
    prepare.ensure_dataset(config, log=log)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('nsmae_dataset_ready')
  return config.data.data_dir
