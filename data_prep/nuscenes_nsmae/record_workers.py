"""Stage 1 of the converter: one record file per key frame, made in worker processes.

Workers are forked when that is safe, so that they inherit the loaded tables and maps for
free, and spawned otherwise (each loads them itself): a process that imported JAX or
TensorFlow, or runs other threads, may hold a lock in another thread at the fork, and a child
that needs it hangs (`fork_hazard`). A worker checks an existing record (checksum) and keeps
it, makes a damaged one again, and with `skip_missing` reports a key frame whose input files
are missing instead of raising.
"""

from __future__ import annotations

# Heavy or optional modules (devkit, cv2, tqdm) are imported where they are used.
# pylint: disable=import-outside-toplevel

import collections
import errno
import functools
import logging
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

from data_prep.nuscenes_nsmae import record as record_lib
from data_prep.nuscenes_nsmae import record_io
from nsmae_jax.data import naming

# Write errors that mean "no room": the message then names the directory and how to resume.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class ConversionError(RuntimeError):
  """The conversion cannot go on (e.g. the disk is full); the message says where and what next."""


# Per-process state of the record workers: filled before a fork (inherited copy-on-write), or
# by _init_worker in a spawned worker (which loads the tables itself).
_WORKER: dict[str, Any] = {}


def no_space_error(e: BaseException, directory: str, what: str) -> ConversionError:
  why = getattr(e, 'strerror', None) or str(e).rsplit('; ', 1)[-1]
  return ConversionError(
      f'no space left writing {what} into {directory} ({why}); the finished records are '
      'kept: free space and rerun the same command to resume')


def _write_record(job: tuple[str, str]) -> tuple[str, str, str, str]:
  """Makes, or checks and keeps, the record of one key frame.

  Returns (split, token, outcome, missing file): outcome 'made', 'reused' (an intact record of
  an earlier run), 'redone' (a damaged one was replaced) or 'skipped' (a missing or unreadable
  input file, with --skip_missing; the file is returned).
  """
  split, token = job
  w = _WORKER
  path = naming.record_path(w['records'], split, token)
  outcome = 'made'
  if os.path.exists(path):
    try:
      record_io.load_record(path)
      return split, token, 'reused', ''
    except record_io.CorruptRecordError as e:
      logging.warning('%s: making it again', e)
      outcome = 'redone'
  nusc = w['nusc']
  sample = nusc.get('sample', token)
  location = nusc.get('log', nusc.get('scene', sample['scene_token'])['log_token'])['location']
  try:
    rec = record_lib.make_record(nusc, w['maps'][location], token, w['settings'])
  except record_lib.MissingInputError as e:
    if not w['skip_missing']:
      raise
    return split, token, 'skipped', e.path or str(e)
  try:
    record_io.save_record(path, rec)
  except OSError as e:
    if e.errno in NO_SPACE:
      raise no_space_error(e, os.path.dirname(path), 'records') from None
    raise
  return split, token, outcome, ''


def load_maps(dataroot: str, locations: Sequence[str]) -> dict[str, Any]:
  """{location: NuScenesMap} (polygons memoized) of a dataroot."""
  from nuscenes.map_expansion.map_api import NuScenesMap
  return {loc: _memoize_polygons(NuScenesMap(dataroot=dataroot, map_name=loc))
          for loc in sorted(locations)}


def _init_worker(spawned_state: dict[str, Any] | None = None) -> None:
  import cv2
  cv2.setNumThreads(1)  # one process per core already
  if spawned_state is not None:
    from nuscenes.nuscenes import NuScenes
    state = dict(spawned_state)
    dataroot, version = state.pop('dataroot'), state.pop('version')
    state['nusc'] = NuScenes(version=version, dataroot=dataroot, verbose=False)
    state['maps'] = load_maps(dataroot, state.pop('locations'))
    _WORKER.update(state)


# Runtimes whose import starts thread pools that take locks at any time (XLA, the TF runtime,
# gRPC): a fork copies such a lock held by another thread, and a child that needs it hangs.
_THREADED_RUNTIMES = ('jax', 'jaxlib', 'tensorflow', 'torch')


def fork_hazard() -> str | None:
  """Why forking this process could deadlock the workers, or None.

  A threaded runtime imported (e.g. a notebook or training process that imported JAX before
  converting), or Python threads besides the main one. The idle native pools of numpy's
  OpenBLAS, OpenCV and the devkit's imports are not counted: OpenBLAS quiesces its pool
  around fork (pthread_atfork) and the others take no lock until used.
  """
  loaded = [name for name in _THREADED_RUNTIMES if name in sys.modules]
  if loaded:
    return f'{", ".join(loaded)} imported'
  if threading.active_count() > 1:
    return f'{threading.active_count()} Python threads running'
  return None


def start_method() -> str:
  """'fork' when that is safe (the workers inherit the loaded tables for free), else 'spawn'
  (each worker loads the tables itself: slower to start, more memory, never deadlocks)."""
  return 'spawn' if fork_hazard() else 'fork'


def make_records(state: dict[str, Any], jobs: list[tuple[str, str]], workers: int,
                  log: Callable[[str], None], method: str | None = None
                  ) -> dict[str, tuple[str, str]]:
  """Stage 1: makes the missing records and checks the existing ones, in `workers` processes
  with a progress bar.

  state: nusc, maps, settings, records, skip_missing, and dataroot, version, locations (what a
  spawned worker needs to load the tables). method: the worker start method (default:
  start_method()). Returns {token: (outcome, missing file)}.
  """
  from tqdm import tqdm
  shared = ('settings', 'records', 'skip_missing')
  _WORKER.update({k: state[k] for k in ('nusc', 'maps', *shared)})
  outcomes: dict[str, tuple[str, str]] = {}
  start = time.time()
  used = 'serial'
  pool = None
  try:
    if workers > 1 and len(jobs) > 1:
      # The pool is started before the progress bar: tqdm's monitor is a thread.
      used = method or start_method()
      spawned = None if used == 'fork' else {
          k: state[k] for k in ('dataroot', 'version', 'locations', *shared)}
      pool = multiprocessing.get_context(used).Pool(
          min(workers, len(jobs)), initializer=_init_worker, initargs=(spawned,))
      results = pool.imap_unordered(_write_record, jobs, chunksize=1)
    else:
      results = map(_write_record, jobs)
    with tqdm(total=len(jobs), unit='frame', desc='records', smoothing=0.1,
              dynamic_ncols=True) as bar:
      for _, token, outcome, missing in results:
        outcomes[token] = (outcome, missing)
        bar.update(1)
  except BaseException:
    if pool is not None:
      pool.terminate()  # do not finish the other frames on an error or Ctrl-C
    raise
  finally:
    if pool is not None:
      pool.close()
      pool.join()
    _WORKER.clear()
  counts = collections.Counter(o for o, _ in outcomes.values())
  elapsed = time.time() - start
  log(f'records: {counts["made"]} made, {counts["reused"]} reused, {counts["redone"]} damaged '
      f'and made again, {counts["skipped"]} skipped (missing input) in {elapsed:.1f} s '
      f'({len(jobs) / max(elapsed, 1e-9):.2f} frames/s, {workers} workers, {used})')
  return outcomes


def _memoize_polygons(nusc_map):
  """get_map_mask rebuilds every polygon of a layer from its nodes on each call (~40% of its
  time); a polygon depends only on its token, so cache them per process."""
  nusc_map.extract_polygon = functools.lru_cache(maxsize=None)(nusc_map.extract_polygon)
  return nusc_map
