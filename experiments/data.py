"""Data preparation for the entry points: the converted dataset exists before training starts.

The library never generates or converts data (nsmae_jax reads shards only); the entry points
call `ensure_data(config)` first. In a multi-process run process 0 prepares the data and the
others wait for it.
"""

from __future__ import annotations

from typing import Callable

from data_prep import prepare
from nsmae_jax.config import Config


def ensure_data(config: Config, log: Callable[[str], None] = print) -> str:
  """Returns config.data.data_dir once its dataset exists (data_prep.prepare.ensure_dataset)."""
  import jax  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(config.train)
  if jax.process_index() == 0:
    prepare.ensure_dataset(config, log=log)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('nsmae_dataset_ready')
  return config.data.data_dir
