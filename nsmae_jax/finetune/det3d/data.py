"""What detection evaluation needs beyond the device batch: each eval example's sample token and
poses, and its position in the split.

The pipeline's batches carry numeric arrays only; DetectionEval needs the sample token and the
LiDAR-to-global transform of every prediction. eval_batches() adds `index` int32 [D, B] (the
example's record index in the split) to the pipeline's eval batches, so the device side can tag
its predictions with it; split_metadata() maps that index to the token and poses on the host.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from nsmae_jax.config import Config


def split_metadata(config: Config, split: str = 'val') -> list[dict]:
  """Per record of the split, in stored (record index) order: {'token': str, 'lidar2ego',
  'ego2global': float64 [4, 4], 'num_boxes': int} read from the converted shards (cached)."""
  return list(_split_metadata(config.data, split))


@functools.lru_cache(maxsize=4)
def _split_metadata(data_config, split: str) -> tuple[dict, ...]:
  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.pipeline import open_split
  from nsmae_jax.data.shards import ShardIndex
  features, files = open_split(Config(data=data_config), split)
  index = ShardIndex(files)
  out = []
  try:
    for i in range(len(index)):
      ex = features.deserialize_example_np(index.read(i))  # NumPy decoding, no TensorFlow
      token = ex['token']
      out.append({'token': token.decode() if isinstance(token, bytes) else str(token),
                  'lidar2ego': np.asarray(ex['lidar2ego'], np.float64),
                  'ego2global': np.asarray(ex['ego2global'], np.float64),
                  'num_boxes': int(np.shape(ex['boxes'])[0])})
  finally:
    index.close()
  return tuple(out)


def eval_batches(config: Config, split: str = 'val') -> Iterator[dict]:
  """The pipeline's eval batches (one pass, stored order) plus `index` int32 [D, B].

  The pipeline documents its order: stream position q goes to process q % process_count, a
  process' batch k holds its positions k L .. k L + L - 1 (L = local devices x per-device batch),
  and an eval stream is the split in stored order, so position q is record q (padding past the
  end repeats record 0 with valid False). Each valid example's box count is checked against its
  record, so a change of that order fails loudly instead of mislabelling predictions.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  meta = split_metadata(config, split)
  iterator = pipeline.make_eval_iterator(config, split=split)
  try:
    yield from _with_index(iterator, meta, split, jax.process_index(), jax.process_count())
  finally:  # the loop closes this generator after a pass: release the pipeline's readers too
    if hasattr(iterator, 'close'):
      iterator.close()


def _with_index(batches, meta: list[dict], split: str, pi: int, pc: int) -> Iterator[dict]:
  """Adds `index` [D, B] to eval batches of process pi of pc (see eval_batches) and checks it."""
  for k, batch in enumerate(batches):
    if 'index' not in batch:
      d, b = batch['valid'].shape
      local = k * d * b + np.arange(d * b).reshape(d, b)
      q = local * pc + pi
      batch['index'] = np.where(q < len(meta), q, 0).astype(np.int32)
    for index, valid, mask in zip(batch['index'].reshape(-1), batch['valid'].reshape(-1),
                                  batch['boxes_mask'].reshape(-1, batch['boxes_mask'].shape[-1])):
      want = min(meta[index]['num_boxes'], mask.shape[0])
      if valid and int(mask.sum()) != want:
        raise RuntimeError(f'eval example {index} of {split!r} has {int(mask.sum())} boxes, its '
                           f'record {want}: the eval stream order is not the stored order')
    yield batch
