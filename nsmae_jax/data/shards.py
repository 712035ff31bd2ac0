"""Random access to the records of TFRecord shards, and naming the shard that is broken.

A TFRecord file is a sequence of [uint64 length][uint32 crc][data][uint32 crc]. Indexing the
headers once gives every record's (shard, offset, length), so the input pipeline's grain data
source can read any example by index: grain's seeded index shuffle then gives an exact, cheaply
resumable shuffle that splits across processes. No TensorFlow is needed to read or check a shard.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Sequence

import numpy as np

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data


class ShardError(IOError):
  """A TFRecord shard is truncated or corrupt; the message names the shard."""


class ShardIndex:
  """(shard, offset, length) of every record of a list of TFRecord shards, in file order.

  Picklable (the arrays travel, open files do not), so grain worker processes can read through
  it without scanning the shards again.
  """

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
    self._lock = threading.Lock()  # grain reads from several threads

  def __len__(self) -> int:
    return len(self.shard)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state['_fds'], state['_lock']
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._fds = {}
    self._lock = threading.Lock()

  def read(self, index: int) -> bytes:
    """The serialized record `index` (no CRC check: `check` explains a record that fails)."""
    k = int(self.shard[index])
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
    data = os.pread(fd, int(self.length[index]), int(self.offset[index]))
    if len(data) != self.length[index]:
      raise ShardError(f'{self.paths[k]}: record at byte {self.offset[index]} is truncated')
    return data

  def describe(self, index: int) -> str:
    """'path: record r at byte b' for error messages (r counts within the shard)."""
    k = int(self.shard[index])
    first = int(np.searchsorted(self.shard, k))
    return f'{self.paths[k]}: record {index - first} at byte {int(self.offset[index])}'

  def check(self, index: int) -> str | None:
    """None if record `index` passes its length and data CRCs, else what fails."""
    k, off, n = int(self.shard[index]), int(self.offset[index]), int(self.length[index])
    with open(self.paths[k], 'rb') as f:
      f.seek(off - _HEADER)
      raw = f.read(_HEADER + n + _FOOTER)
    if len(raw) != _HEADER + n + _FOOTER:
      return 'truncated record'
    (length_crc,) = struct.unpack('<I', raw[8:12])
    if masked_crc32c(raw[:8]) != length_crc:
      return 'length CRC mismatch'
    (data_crc,) = struct.unpack('<I', raw[-4:])
    if masked_crc32c(raw[_HEADER:-_FOOTER]) != data_crc:
      return 'data CRC mismatch'
    return None

  def error(self, index: int, cause: Exception) -> ShardError:
    """The ShardError for a record that failed to decode: corrupt (CRC) or undecodable."""
    problem = self.check(index)
    if problem:
      return ShardError(f'corrupt shard: {self.describe(index)}: {problem} ({cause!r})')
    return ShardError(f'cannot decode {self.describe(index)} (its CRCs pass): {cause!r}')

  def close(self) -> None:
    fds, self._fds = self._fds, {}
    for fd in fds.values():
      os.close(fd)

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


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data` (pure Python: ~5 MB/s, for the error path only)."""
  crc, table = 0xFFFFFFFF, _CRC32C
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
