"""Random access to the records of TFRecord shards, and naming the shard that is broken.

A TFRecord file is a sequence of [uint64 length][uint32 crc][data][uint32 crc]. Indexing the
headers once gives every record's (shard, offset, length), so the input pipeline can read any
example by index: a seeded permutation per epoch then gives a shuffle that is exact, cheap to
resume (the state is one integer) and splittable across processes.
"""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os
import struct
from typing import Sequence

import numpy as np

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data


class ShardError(IOError):
  """A TFRecord shard is truncated or corrupt; the message names the shard."""


class ShardIndex:
  """(shard, offset, length) of every record of a list of TFRecord shards, in file order."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.fspath(p) for p in paths]
    shard, offset, length = [], [], []
    for k, path in enumerate(self.paths):
      for off, n in _scan(path):
        shard.append(k)
        offset.append(off)
        length.append(n)
    self.shard = np.asarray(shard, np.int64)
    self.offset = np.asarray(offset, np.int64)
    self.length = np.asarray(length, np.int64)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return len(self.shard)

  def read(self, index: int) -> bytes:
    """The serialized record `index` (no CRC check; decoding errors are traced by `verify`)."""
    k = int(self.shard[index])
    fd = self._fds.get(k)
    if fd is None:
      fd = self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
    data = os.pread(fd, int(self.length[index]), int(self.offset[index]))
    if len(data) != self.length[index]:
      raise ShardError(f'{self.paths[k]}: record at byte {self.offset[index]} is truncated')
    return data

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _scan(path: str) -> list[tuple[int, int]]:
  """(data offset, data length) of each record of one shard; ShardError if truncated."""
  size = os.path.getsize(path)
  records = []
  with open(path, 'rb') as f:
    pos = 0
    while pos < size:
      f.seek(pos)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise ShardError(f'{path}: truncated shard (partial record header at byte {pos})')
      (length,) = struct.unpack('<Q', header[:8])
      end = pos + _HEADER + length + _FOOTER
      if end > size:
        raise ShardError(f'{path}: truncated shard (record at byte {pos} needs {end} bytes, '
                         f'file has {size})')
      records.append((pos + _HEADER, length))
      pos = end
  return records


def verify(paths: Sequence[str]) -> list[str]:
  """The shards among `paths` that fail TensorFlow's CRC-checked read, each with its error."""
  import tensorflow as tf
  bad = []
  for path in paths:
    try:
      for _ in tf.data.TFRecordDataset(path).batch(256):
        pass
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      bad.append(f'{path}: {e.message.splitlines()[0]}')
  return bad
