"""The grain input pipeline over the converted `nuscenes_nsmae` TFRecord shards.

Order: a grain data source reads records by index through shards.ShardIndex. Training examples
of a split (or its labelled_subset at a label fraction) form an endless stream of epochs, each
grain's index shuffle seeded by (seed, epoch) (MapDataset.shuffle + repeat). Stream position q
goes to process q % process_count; a process' batch k holds its positions k*L .. k*L+L-1
(L = local devices x per-device batch). Each example is decoded at its stream position by
decode.Decoder (numpy, seeded by (seed, q)), batched by grain, read ahead by grain's reader
threads and, optionally, its worker processes. So the batches are a function of (seed, batch
number) only: the same seed gives the same batches whatever the thread or worker count, and
get_state()/set_state() (grain's iterator state) continue exactly.

Eval: one pass over the split in stored order, position q to process q % process_count, padded
to whole batches on every process; padding slots repeat the split's first example with
valid = False.

Batch layout (host numpy, DESIGN.md "The batch" with a leading device axis), geometry in the key
frame's LIDAR_TOP frame: images float32 [D, B, 6, H, W, 3] in [0, 1]; intrinsics [D, B, 6, 3, 3];
cam2lidar [D, B, 6, 4, 4]; points float32 [D, B, P, 5] (x, y, z, intensity, time lag) with
points_mask bool [D, B, P]; bev_map uint8 [D, B, 6, Hb, Wb]; boxes float32 [D, B, M, 9] with
boxes_mask bool [D, B, M]; box_labels int32 [D, B, M]. Eval batches add valid bool [D, B].

Read-ahead: min(cores, 8) reader threads per process, max(config.data.prefetch, threads) batches
buffered; `num_workers` > 0 adds that many grain worker processes (spawned, each with a copy of
the index; they take seconds to start, so they pay off only where decoding limits the step).
A saved state resumes only with the same num_workers (grain's state has one entry per worker).

No TensorFlow: TFDS reads the dataset's metadata and decodes records with NumPy, so worker
processes start light and nothing is left to tear down at interpreter exit but grain's own
threads and processes (close() releases them early).
"""

from __future__ import annotations

# Heavy or optional modules (jax) are imported where they are used.
# pylint: disable=import-outside-toplevel

import math
from multiprocessing import util as mp_util
import os
from typing import Any
import weakref

import grain
import numpy as np
import tensorflow_datasets as tfds

from nsmae_jax.config import Config
from nsmae_jax.data import augment as augment_lib
from nsmae_jax.data import naming
from nsmae_jax.data import subsets
from nsmae_jax.data.decode import Decoder
from nsmae_jax.data.shards import ShardIndex

# Reader threads per process: decoding is numpy / OpenCV / zlib work that mostly releases the
# GIL, so a few threads use the cores; more only add memory.
_MAX_THREADS = 8


def open_split(config: Config, split: str) -> tuple[Any, list[str]]:
  """(tfds features, shard paths) of a split of the dataset for config.data."""
  path = naming.dataset_dir(config.data.data_dir, config.data)
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    raise FileNotFoundError(f'--data_dir: no converted dataset at {path} (run python -m '
                            'data_prep.convert_nuscenes, or --synthetic)')
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {path} (has {sorted(builder.info.splits)})')
  files = [os.fspath(p) for p in builder.info.splits[split].filepaths]
  return builder.info.features, files


class ShardSource:
  """grain random-access data source: element i is (record, serialized bytes) of record
  `records[i]` of the shards (records index the split's stored order)."""

  def __init__(self, index: ShardIndex, records: np.ndarray):
    self._index = index
    self._records = np.asarray(records, np.int64)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    record = int(self._records[i])
    return record, self._index.read(record)

  def __repr__(self) -> str:
    return f'ShardSource({len(self)} of {len(self._index)} records in {self._index.paths})'


class _Iterator:
  """Host batches [D, B, ...] of one process from a grain dataset of batches; checkpointable."""

  def __init__(self, batches: grain.MapDataset, *, devices: int, per_device: int,
               num_workers: int, prefetch: int, identity: dict[str, Any],
               num_batches: int | None):
    self._batches = batches
    self._shape = (devices, per_device)
    self._num_workers = num_workers
    threads = max(1, min(os.cpu_count() or 1, _MAX_THREADS))
    self._read_options = grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=max(prefetch, threads))
    self._identity = dict(identity, num_workers=num_workers)
    self.num_batches = num_batches
    self._prefetch = max(1, prefetch)
    self._next_batch = 0
    self._grain_iter = None
    self._restore: Any = None
    if num_workers:
      # grain's own exit-time close of its workers runs after multiprocessing has closed their
      # queues (it fails and leaves shared memory to the resource tracker): close first. A
      # finalizer, not an exit hook: it holds the iterator weakly and dies with it.
      mp_util.Finalize(self, _close_if_alive, args=(weakref.ref(self),), exitpriority=20)

  def _iterator(self):
    if self._grain_iter is None:
      ds = self._batches.to_iter_dataset(self._read_options)
      if self._num_workers:
        _parse_flags_for_grain()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._num_workers, per_worker_buffer_size=self._prefetch))
      self._grain_iter = iter(ds)
      if self._restore is not None:
        self._grain_iter.set_state(self._restore)
        self._restore = None
    return self._grain_iter

  def close(self) -> None:
    """Stops grain's reader threads and worker processes; iteration can restart after it."""
    it, self._grain_iter = self._grain_iter, None
    if it is not None:
      self._restore = it.get_state()
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator())
    self._next_batch += 1
    if self._num_workers:
      # Worker batches arrive in shared memory: copy them out so the block is unlinked now,
      # not whenever (at interpreter exit: if ever) the caller drops the batch.
      batch = {k: np.array(v) for k, v in batch.items()}
    return {k: v.reshape(self._shape + v.shape[1:]) for k, v in batch.items()}

  # ---- checkpointing ----
  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: grain's iterator state, and what the order depends on."""
    grain_state = self._restore if self._grain_iter is None else self._grain_iter.get_state()
    if grain_state is None:
      grain_state = self._iterator().get_state()
    return dict(self._identity, next_batch=self._next_batch, grain=grain_state)

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue after the batches of `state` (same seed / split / layout / workers required)."""
    for key, mine in self._identity.items():
      # Every process is at the same batch with the same grain state, so process 0's saved
      # state resumes them all: process_index is informative only.
      if key != 'process_index' and key in state and state[key] != mine:
        hint = ('resume with the same num_workers' if key == 'num_workers' else
                'the saved order cannot be continued')
        raise ValueError(f'data iterator state has {key}={state[key]!r}, this iterator '
                         f'{mine!r}: {hint}')
    if 'grain' not in state:
      raise ValueError('data iterator state without a grain position (saved by the tf.data '
                       'pipeline, whose order differs): the saved order cannot be continued')
    self._next_batch = int(state['next_batch'])
    if self._grain_iter is None:
      self._restore = state['grain']
    else:
      self._grain_iter.set_state(state['grain'])


def _parse_flags_for_grain() -> None:
  """grain 0.2.18 reads its absl flag --grain_enable_multiprocess_worker_profiling when it
  starts workers, which raises in a program that never parsed flags (a notebook, pytest); there,
  flags are marked parsed (all defaults), as absl's own test runner does."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _close_if_alive(ref: 'weakref.ref[_Iterator]') -> None:
  iterator = ref()
  if iterator is not None:
    iterator.close()


def _decoder(config: Config, index: ShardIndex, features: Any, *,
             augmentation: augment_lib.Augmentation | None = None,
             num_valid: int | None = None) -> Decoder:
  d = config.data
  seed = config.train.seed
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f'--seed must be in [0, 2**32) for the input pipeline, got {seed}')
  return Decoder(index=index, features=features, seed=seed, max_points=d.max_points,
                 max_boxes=d.max_boxes, bev_half_extent=float(d.bev_half_extent),
                 bev_resolution=float(d.bev_resolution), augmentation=augmentation,
                 num_valid=num_valid)


def _layout(process_index, process_count, num_local_devices) -> tuple[int, int, int]:
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  devices = jax.local_device_count() if num_local_devices is None else num_local_devices
  if not 0 <= pi < pc:
    raise ValueError(f'process_index {pi} not in [0, {pc})')
  return pi, pc, devices


def _open(config: Config, split: str) -> tuple[Any, ShardIndex]:
  features, files = open_split(config, split)
  index = ShardIndex(files)
  if len(index) == 0:
    raise ValueError(f'split {split!r} of {config.data.data_dir} is empty')
  return features, index


def make_train_iterator(config: Config, *, label_fraction: float = 1.0, subset_seed: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        num_local_devices: int | None = None, split: str = 'train',
                        augmentation: augment_lib.Augmentation | None = None,
                        num_workers: int | None = None) -> _Iterator:
  """Infinite iterator of host batches [num_local_devices, per_device_batch_size, ...].

  Deterministic for config.train.seed; label_fraction < 1 keeps subsets.labelled_subset
  (subset_seed) of the split's key frames. get_state()/set_state() resume the exact batch
  sequence. `augmentation` (off by default) applies a seeded global rotation/flip/scale per
  example. `num_workers` > 0 decodes in that many grain worker processes (same batches;
  default config.data.data_workers).
  process_index / process_count / num_local_devices default to jax's.
  """
  pi, pc, devices = _layout(process_index, process_count, num_local_devices)
  local = devices * config.train.per_device_batch_size
  features, index = _open(config, split)
  examples = subsets.labelled_subset(len(index), label_fraction, subset_seed)
  decoder = _decoder(config, index, features, augmentation=augmentation)
  ds = grain.MapDataset.source(ShardSource(index, examples))
  # grain seeds epoch e with shuffle_seed + e; a hashed seed keeps run seed s + 1 from
  # replaying the epochs of run seed s one epoch early.
  shuffle_seed = int(np.random.SeedSequence(decoder.seed).generate_state(1)[0])
  ds = ds.shuffle(seed=shuffle_seed).repeat()  # each epoch reshuffled
  ds = ds.map_with_index(decoder)  # index = stream position q, before the process split
  ds = ds[pi::pc].batch(local, drop_remainder=True)
  identity = {'seed': decoder.seed, 'split': split, 'num_examples': int(len(examples)),
              'process_index': pi, 'process_count': pc, 'local_batch': local}
  return _Iterator(ds, devices=devices, per_device=config.train.per_device_batch_size,
                   num_workers=(config.data.data_workers if num_workers is None else num_workers),
                   prefetch=config.data.prefetch, identity=identity,
                   num_batches=None)


def make_eval_iterator(config: Config, *, split: str = 'val', process_index: int | None = None,
                       process_count: int | None = None, num_local_devices: int | None = None,
                       num_workers: int | None = None) -> _Iterator:
  """One pass over the split in stored order, every example exactly once across processes.

  All processes yield the same number of batches (`.num_batches`); `valid` [D, B] is False on
  the padding slots (they repeat the split's first example).
  """
  pi, pc, devices = _layout(process_index, process_count, num_local_devices)
  local = devices * config.train.per_device_batch_size
  features, index = _open(config, split)
  n = len(index)
  num_batches = math.ceil(n / (pc * local))
  slots = np.arange(num_batches * pc * local)
  records = np.where(slots < n, slots, 0)
  decoder = _decoder(config, index, features, num_valid=n)
  ds = grain.MapDataset.source(ShardSource(index, records)).map_with_index(decoder)
  ds = ds[pi::pc].batch(local, drop_remainder=True)
  identity = {'seed': decoder.seed, 'split': split, 'num_examples': n, 'process_index': pi,
              'process_count': pc, 'local_batch': local}
  return _Iterator(ds, devices=devices, per_device=config.train.per_device_batch_size,
                   num_workers=(config.data.data_workers if num_workers is None else num_workers),
                   prefetch=config.data.prefetch, identity=identity,
                   num_batches=num_batches)
