"""The tf.data input pipeline over the converted `nuscenes_nsmae` shards.

Order: the examples of a split (or a seeded label_fraction subset) form an endless stream of
epochs, each a permutation seeded by (seed, epoch). Stream position q goes to process
q % process_count; a process' batch k holds its positions k*L .. k*L+L-1 (L = local devices x
per-device batch). Records are read by index from the shards (shards.ShardIndex), decoded and
padded in a parallel, order-preserving tf.data map, batched and prefetched. So the order is a
function of (seed, position) only: the same seed gives the same batches, the iterator state is
the next batch number, and a restored iterator continues exactly. The whole-split permutation
replaces a shuffle buffer.

Per-example randomness (point subsampling when N > P, augmentation) is seeded by
(seed, stream position), so it is reproducible too.

Batch layout (host numpy, DESIGN.md "The batch" with a leading device axis), geometry in the key
frame's LIDAR_TOP frame: images float32 [D, B, 6, H, W, 3] in [0, 1]; intrinsics [D, B, 6, 3, 3];
cam2lidar [D, B, 6, 4, 4]; points float32 [D, B, P, 5] (x, y, z, intensity, time lag) with
points_mask bool [D, B, P]; bev_map uint8 [D, B, 6, Hb, Wb]; boxes float32 [D, B, M, 9] with
boxes_mask bool [D, B, M]; box_labels int32 [D, B, M]. Eval batches add valid bool [D, B].
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import atexit
import collections
import gc
import math
import os
import weakref
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nsmae_jax.config import Config
from nsmae_jax.data import augment as augment_lib
from nsmae_jax.data import naming
from nsmae_jax.data.shards import ShardError, ShardIndex, verify

BATCH_KEYS = ('images', 'intrinsics', 'cam2lidar', 'points', 'points_mask', 'bev_map', 'boxes',
              'boxes_mask', 'box_labels')


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


def _fit(example: dict[str, tf.Tensor], config: Config, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """Images to [0, 1]; points to P (seeded subsample or zero pad), boxes to M, with masks."""
  p, m = config.data.max_points, config.data.max_boxes
  points = example['points']
  n = tf.shape(points)[0]
  # A seeded random subset when there are too many points, kept in the stored order (key
  # frame first, then older sweeps). stateless_shuffle is ~4x faster than top_k / argsort of
  # random keys at 64k points, which made subsampling the pipeline's bottleneck.
  points = tf.cond(
      n > p,
      lambda: tf.gather(points, tf.sort(
          tf.random.experimental.stateless_shuffle(tf.range(n), seed=seed)[:p])),
      lambda: points)
  count = tf.shape(points)[0]
  points = tf.pad(points, [[0, p - count], [0, 0]])
  boxes, labels = example['boxes'][:m], example['box_labels'][:m]
  nb = tf.shape(boxes)[0]
  return {
      'images': tf.image.convert_image_dtype(example['images'], tf.float32),
      'intrinsics': example['intrinsics'],
      'cam2lidar': example['cam2lidar'],
      'points': tf.ensure_shape(points, [p, 5]),
      'points_mask': tf.range(p) < count,
      'bev_map': example['bev_map'],
      'boxes': tf.ensure_shape(tf.pad(boxes, [[0, m - nb], [0, 0]]), [m, 9]),
      'boxes_mask': tf.range(m) < nb,
      'box_labels': tf.ensure_shape(tf.pad(labels, [[0, m - nb]]), [m]),
  }


# Live iterators are closed at exit, while the interpreter is still whole: a tf.data iterator over
# from_generator that is finalised during interpreter teardown can deadlock (seen: a pytest
# process that never exited after its last test).
_LIVE: 'weakref.WeakSet[_Iterator]' = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE):
    iterator.close()
  gc.collect()


class _Iterator:
  """Batches of one process in the stream order of the module docstring; checkpointable."""

  def __init__(self, config: Config, split: str, *, train: bool, label_fraction: float,
               subset_seed: int, process_index: int | None, process_count: int | None,
               num_local_devices: int | None, augmentation: augment_lib.Augmentation | None):
    import jax
    self._config = config
    self._split = split
    self._train = train
    self._pi = jax.process_index() if process_index is None else process_index
    self._pc = jax.process_count() if process_count is None else process_count
    self._devices = jax.local_device_count() if num_local_devices is None else num_local_devices
    self._per_device = config.train.per_device_batch_size
    self._local = self._devices * self._per_device
    self._seed = config.train.seed
    self._augmentation = augmentation
    self._features, self._files = open_split(config, split)
    self._index = ShardIndex(self._files)
    total = len(self._index)
    if total == 0:
      raise ValueError(f'split {split!r} of {config.data.data_dir} is empty')
    if not 0.0 < label_fraction <= 1.0:
      raise ValueError(f'label_fraction must be in (0, 1], got {label_fraction}')
    if label_fraction < 1.0:
      keep = max(1, int(round(label_fraction * total)))
      subset = np.random.default_rng([subset_seed, total]).permutation(total)[:keep]
      self._examples = np.sort(subset)
    else:
      self._examples = np.arange(total)
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._next_batch = 0
    self._tf_iter = None
    n, g = len(self._examples), self._pc * self._local
    self.num_batches = math.ceil(n / g) if not train else None
    _LIVE.add(self)

  def close(self) -> None:
    """Releases the tf.data iterator (and its prefetch threads); iteration can restart."""
    tf_iter, self._tf_iter = self._tf_iter, None
    if tf_iter is not None:
      tf_iter.close()

  # ---- order ----
  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      rng = np.random.default_rng([self._seed, epoch])
      self._perms[epoch] = self._examples[rng.permutation(len(self._examples))]
      while len(self._perms) > 2:
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def _slot(self, batch: int, b: int) -> tuple[int, int, bool]:
    """(record index, stream position, valid) of element b of this process' batch."""
    q = (batch * self._local + b) * self._pc + self._pi
    n = len(self._examples)
    if self._train:
      epoch, j = divmod(q, n)
      return int(self._perm(epoch)[j]), q, True
    if q < n:
      return int(self._examples[q]), q, True
    return int(self._examples[0]), q, False  # padding of the last eval batch

  def _records(self, start: int) -> Iterator[tuple[bytes, int, bool]]:
    batch = start
    while self.num_batches is None or batch < self.num_batches:
      for b in range(self._local):
        index, q, valid = self._slot(batch, b)
        yield self._index.read(index), q, valid
      batch += 1

  # ---- tf.data ----
  def _dataset(self, start: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_generator(
        lambda: self._records(start),
        output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64),
                          tf.TensorSpec([], tf.bool)))
    features, config, seed, aug = self._features, self._config, self._seed, self._augmentation

    def decode(serialized, position, valid):
      example = features.deserialize_example(serialized)
      ex_seed = tf.stack([tf.constant(seed, tf.int64), position])
      if aug is not None:
        example = augment_lib.random_global_transform(example, aug, config, ex_seed + 1)
      out = _fit(example, config, ex_seed)
      if not self._train:
        out['valid'] = valid
      return out

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self._local, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    return ds.with_options(options).prefetch(max(1, self._config.data.prefetch))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._next_batch >= self.num_batches:
      raise StopIteration
    if self._tf_iter is None:
      self._tf_iter = iter(tfds.as_numpy(self._dataset(self._next_batch)))
    try:
      batch = next(self._tf_iter)
    except StopIteration:
      raise
    except ShardError:
      raise
    # Decoding a damaged record fails in many ways (parse, JPEG, zlib, even a UnicodeDecodeError
    # while TF formats the message): trace any of them to the shard.
    except Exception as e:  # pylint: disable=broad-except
      self._tf_iter = None
      raise self._shard_error(e) from e
    self._next_batch += 1
    shape = (self._devices, self._per_device)
    return {k: v.reshape(shape + v.shape[1:]) for k, v in batch.items()}

  def _shard_error(self, error: Exception) -> ShardError:
    """Names the shard(s) behind a decoding error of the next batch."""
    indices = {self._slot(self._next_batch, b)[0] for b in range(self._local)}
    shards = sorted({self._files[self._index.shard[i]] for i in indices})
    bad = verify(shards)
    if bad:
      return ShardError('corrupt shard: ' + '; '.join(bad))
    return ShardError(f'cannot decode batch {self._next_batch} read from {shards}: {error}')

  # ---- checkpointing ----
  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next batch, and what the order depends on."""
    return {'next_batch': self._next_batch, 'seed': self._seed, 'split': self._split,
            'num_examples': int(len(self._examples)), 'process_index': self._pi,
            'process_count': self._pc, 'local_batch': self._local}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue after the batches of `state` (same seed / split / layout required)."""
    mine = self.get_state()
    for key in ('seed', 'split', 'num_examples', 'process_count', 'local_batch'):
      if key in state and state[key] != mine[key]:
        raise ValueError(f'data iterator state has {key}={state[key]!r}, this iterator '
                         f'{mine[key]!r}: the saved order cannot be continued')
    self._next_batch = int(state['next_batch'])
    self.close()


def make_train_iterator(config: Config, *, label_fraction: float = 1.0, subset_seed: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        num_local_devices: int | None = None, split: str = 'train',
                        augmentation: augment_lib.Augmentation | None = None) -> _Iterator:
  """Infinite iterator of host batches [num_local_devices, per_device_batch_size, ...].

  Deterministic for config.train.seed; label_fraction < 1 keeps a seeded subset (subset_seed)
  of the split's key frames. get_state()/set_state() resume the exact batch sequence.
  `augmentation` (off by default) applies a seeded global rotation/flip/scale per example.
  """
  return _Iterator(config, split, train=True, label_fraction=label_fraction,
                   subset_seed=subset_seed, process_index=process_index,
                   process_count=process_count, num_local_devices=num_local_devices,
                   augmentation=augmentation)


def make_eval_iterator(config: Config, *, split: str = 'val', process_index: int | None = None,
                       process_count: int | None = None,
                       num_local_devices: int | None = None) -> _Iterator:
  """One pass over the split in stored order, every example exactly once across processes.

  All processes yield the same number of batches (`.num_batches`); `valid` [D, B] is False on
  the padding slots of the last batch (they repeat the split's first example).
  """
  return _Iterator(config, split, train=False, label_fraction=1.0, subset_seed=0,
                   process_index=process_index, process_count=process_count,
                   num_local_devices=num_local_devices, augmentation=None)


def prefetch_to_device(iterator, size: int = 2, devices=None):
  """Yields batches as jax arrays sharded over `devices` along the leading axis, `size` ahead."""
  import jax
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.asarray(devices), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))
  queue = collections.deque()

  def put(batch):
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
