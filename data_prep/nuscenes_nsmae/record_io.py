"""The converter's per-key-frame record files: plain arrays, checksummed, never pickle.

A record file is an uncompressed `.npz` (a zip of `.npy` arrays) read with
`allow_pickle=False`, so reading one can never run code: strings are fixed-width unicode
arrays, the six JPEGs one uint8 array with their lengths, everything else numeric arrays.
A SHA-256 over every array (name, dtype, shape, bytes) is stored with them; `load_record`
checks it and the layout, so a tampered, truncated or otherwise damaged file is a
`CorruptRecordError` naming the file, never a half-read record. `save_record` writes to a
temporary name in the same directory and renames, so a killed writer leaves no partial file
under the final name.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Any

import numpy as np

from nsmae_jax.data.schema import NUM_CAMERAS, NUM_MAP_CLASSES

# What the TFDS builder encodes (DESIGN.md "The record"), and the extras only the converter's
# statistics read (never written into the shards).
FEATURE_KEYS = ('token', 'scene_name', 'timestamp', 'images', 'intrinsics', 'cam2lidar',
                'lidar2ego', 'ego2global', 'points', 'bev_map', 'boxes', 'box_labels')
EXTRA_KEYS = ('invalid_points',)  # LiDAR returns dropped as non-finite or absurd (a count).

# Stored array name -> (dtype, shape; None = any length). Images are stored as one byte array.
_LAYOUT = {
    'token': ('<U', ()), 'scene_name': ('<U', ()), 'timestamp': ('<i8', ()),
    'image_bytes': ('|u1', (None,)), 'image_lengths': ('<i8', (NUM_CAMERAS,)),
    'intrinsics': ('<f4', (NUM_CAMERAS, 3, 3)), 'cam2lidar': ('<f4', (NUM_CAMERAS, 4, 4)),
    'lidar2ego': ('<f4', (4, 4)), 'ego2global': ('<f4', (4, 4)), 'points': ('<f4', (None, 5)),
    'bev_map': ('|u1', (NUM_MAP_CLASSES, None, None)), 'boxes': ('<f4', (None, 9)),
    'box_labels': ('<i4', (None,)), 'invalid_points': ('<i8', ()),
}
_CHECKSUM = 'sha256'


class CorruptRecordError(ValueError):
  """A record file that does not hold a complete, intact record; the message names it."""


def _digest(arrays: dict[str, np.ndarray]) -> np.ndarray:
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(f'{name}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return np.frombuffer(h.digest(), np.uint8)


def _to_arrays(record: dict[str, Any]) -> dict[str, np.ndarray]:
  images = [np.frombuffer(bytes(b), np.uint8) for b in record['images']]
  arrays = {
      'token': np.array(str(record['token'])),
      'scene_name': np.array(str(record['scene_name'])),
      'timestamp': np.asarray(record['timestamp'], np.int64),
      'image_bytes': np.concatenate(images) if images else np.zeros(0, np.uint8),
      'image_lengths': np.array([len(b) for b in images], np.int64),
      'invalid_points': np.asarray(record.get('invalid_points', 0), np.int64),
  }
  for key in ('intrinsics', 'cam2lidar', 'lidar2ego', 'ego2global', 'points', 'boxes'):
    arrays[key] = np.asarray(record[key], np.float32)
  arrays['bev_map'] = np.asarray(record['bev_map'], np.uint8)
  arrays['box_labels'] = np.asarray(record['box_labels'], np.int32)
  return arrays


def save_record(path: str, record: dict[str, Any]) -> None:
  """Writes `record` (FEATURE_KEYS, optionally EXTRA_KEYS) to `path` atomically.

  Raises OSError (e.g. ENOSPC, EFBIG) with the temporary file removed: a failed write leaves
  neither a partial file nor a temporary one behind.
  """
  arrays = _to_arrays(record)
  _check_layout(path, arrays)
  arrays[_CHECKSUM] = _digest(arrays)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def _check_layout(path: str, arrays: dict[str, np.ndarray]) -> None:
  if set(arrays) != set(_LAYOUT):
    raise CorruptRecordError(f'{path}: arrays {sorted(arrays)} are not a record\'s '
                             f'{sorted(_LAYOUT)}')
  for name, (dtype, shape) in _LAYOUT.items():
    a = arrays[name]
    dtype_ok = a.dtype.str.startswith(dtype) if dtype == '<U' else a.dtype.str == dtype
    shape_ok = len(a.shape) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, a.shape))
    if not (dtype_ok and shape_ok):
      raise CorruptRecordError(f'{path}: {name} is {a.dtype.str} {a.shape}, a record holds '
                               f'{dtype} {shape}')
  if int(arrays['image_lengths'].sum()) != arrays['image_bytes'].size or np.any(
      arrays['image_lengths'] <= 0):
    raise CorruptRecordError(f'{path}: image lengths {arrays["image_lengths"].tolist()} do '
                             f'not split {arrays["image_bytes"].size} image bytes')


def load_record(path: str) -> dict[str, Any]:
  """The record in `path`: FEATURE_KEYS (images as 6 JPEG byte strings) and EXTRA_KEYS.

  Raises FileNotFoundError if it is missing and CorruptRecordError (naming the file) if it is
  not an intact record written by save_record. Never unpickles anything.
  """
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise CorruptRecordError(f'{path}: not a record (a bare .npy array, not an .npz)')
    with loaded as npz:
      arrays = {name: npz[name] for name in npz.files}
  except FileNotFoundError:
    raise
  except CorruptRecordError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    # ValueError includes numpy's refusal of pickled content.
    raise CorruptRecordError(f'{path}: unreadable record ({type(e).__name__}: {e}); delete it '
                             'and rerun the converter to make it again') from e
  checksum = arrays.pop(_CHECKSUM, None)
  _check_layout(path, arrays)
  if checksum is None or not np.array_equal(checksum, _digest(arrays)):
    raise CorruptRecordError(f'{path}: checksum mismatch (the file was changed or damaged '
                             'after it was written); delete it and rerun the converter')
  ends = np.cumsum(arrays['image_lengths'])
  data = arrays['image_bytes'].tobytes()
  images = [data[e - n:e] for e, n in zip(ends.tolist(), arrays['image_lengths'].tolist())]
  record = {key: arrays[key] for key in FEATURE_KEYS if key in arrays}
  record.update(token=str(arrays['token']), scene_name=str(arrays['scene_name']),
                timestamp=np.int64(arrays['timestamp']), images=images,
                invalid_points=int(arrays['invalid_points']))
  return record


def features_only(record: dict[str, Any]) -> dict[str, Any]:
  """The record without the converter's extras: what the TFDS builder encodes."""
  return {key: record[key] for key in FEATURE_KEYS}
