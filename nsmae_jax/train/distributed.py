"""Multi-host set-up through jax.distributed (TPU pods, multi-node GPU, or CPU processes)."""

from __future__ import annotations

import jax

from nsmae_jax.config import TrainConfig

_initialized = False


def maybe_initialize(train: TrainConfig) -> None:
  """Calls jax.distributed.initialize once when the config asks for several processes.

  With --coordinator_address (and --num_processes / --process_id) the cluster is explicit; with
  --distributed alone JAX detects it (TPU pods, SLURM). Single-host runs do nothing.
  """
  global _initialized
  if _initialized or not (train.distributed or train.coordinator_address):
    return
  if train.coordinator_address:
    jax.distributed.initialize(coordinator_address=train.coordinator_address,
                               num_processes=train.num_processes, process_id=train.process_id)
  else:
    jax.distributed.initialize()
  _initialized = True
