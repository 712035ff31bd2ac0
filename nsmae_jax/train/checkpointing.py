"""orbax checkpoints: the train state and the data iterator position saved together, verified.

Layout: `<workdir>/checkpoints/<step>/{state,data,manifest.json}`. `state` is the (host,
unreplicated) train state as a pytree; `data` is the input iterator's JSON state, so a resumed run
continues with the exact batches it would have seen. Saves are asynchronous; orbax writes into a
temporary directory and renames it on completion, so a run killed mid-save leaves the previous
checkpoint as the latest.

orbax does not notice a damaged file (a flipped byte inside an array chunk restores silently), so
once a save has finished, the primary process writes `manifest.json` (size and sha256 of every
file of the step) and every restore checks it first. A step without a valid manifest (damaged,
truncated, or renamed into place just before a kill -9) is moved to
`<workdir>/checkpoints_damaged/` with a warning naming the step and why, and the run resumes from
the newest good step; when no good step is left the run refuses (CheckpointDamagedError).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from nsmae_jax.train.integrity import MANIFEST, verify_step, write_manifest

_TMP_MARK = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message names the directory."""


class CheckpointWriteError(CheckpointError):
  """Saving a checkpoint failed (e.g. the disk is full); earlier checkpoints are intact."""


class CheckpointDamagedError(CheckpointError):
  """No usable checkpoint is left under a directory that had checkpoints."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def damaged_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints_damaged')


def _is_primary() -> bool:
  return jax.process_index() == 0


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _quarantine(workdir_checkpoints: str, step: int) -> str:
  """Moves <checkpoints>/<step> to <workdir>/checkpoints_damaged/<step>-<time>; returns it."""
  target_root = os.path.join(os.path.dirname(workdir_checkpoints), 'checkpoints_damaged')
  os.makedirs(target_root, exist_ok=True)
  target = os.path.join(target_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.replace(os.path.join(workdir_checkpoints, str(step)), target)
  return target


def _warn(message: str) -> None:
  logging.info('%s', message)  # absl would print a warning to stderr a second time
  if _is_primary():
    print(f'WARNING: {message}', file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:400]


def _write_failure(error: BaseException, directory: str, step: int | None) -> str:
  """A one-paragraph description of why writing a checkpoint under `directory` failed."""
  chain, e = [], error
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  full = ' '.join(str(c) for c in chain)
  disk_full = any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                  for c in chain) or 'No space left on device' in full or (
                      "os_error_code='28'" in full) or 'File too large' in full
  try:
    free = f'{shutil.disk_usage(directory).free / 2**20:.1f} MiB free there now'
  except OSError:
    free = 'free space unknown'
  what = 'the disk is full' if disk_full else _first_line(error)
  return (f'writing checkpoint step {step} under {directory} failed: {what} ({free}). '
          'Earlier checkpoints there are intact; free space (or fix the cause) and rerun the '
          'same command to resume from the latest of them.')


def _remove_temporary(directory: str, step: int | None) -> None:
  """Deletes orbax's unfinished temporary directory of `step` (frees the space it took)."""
  if step is None or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.startswith(f'{step}.') and _TMP_MARK in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """One CheckpointManager for a run's workdir, with integrity manifests and clear errors.

  A step's manifest is written as soon as its asynchronous save has finished, by a small thread
  that waits for it, so the step counts as good even while the loop is busy (a kill -9 then
  loses nothing saved). poll() (once per train step), save(), wait() and close() raise
  CheckpointWriteError naming the directory when a save failed.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True,
               owner: bool = False):
    """owner=True: this process holds the work dir (the training loop, under its lock), so
    unfinished temporary directories are leftovers of a dead run and are deleted. Readers
    (notebooks, inspection) leave them alone: a live run may be writing one."""
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self._async = async_save
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=owner)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))
    self._unverified: list[int] = []  # saved by this run; no manifest yet
    self._failed: CheckpointWriteError | None = None
    self._manifest_lock = threading.Lock()
    self._watchers: list[threading.Thread] = []

  def latest_step(self) -> int | None:
    """The newest step orbax lists (verified or not; see restore_latest)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # ---- saving ----
  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves host `state` (numpy pytree) and the iterator state at `step` (asynchronously)."""
    self._settle()  # orbax would wait for the previous save anyway; its manifest goes first
    state = jax.device_get(state)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
                                 force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(e, step) from None
    if saved:
      self._unverified.append(step)
      if self._async and _is_primary():
        watcher = threading.Thread(target=self._manifest_when_saved, args=(step,),
                                   name=f'checkpoint-manifest-{step}', daemon=True)
        watcher.start()
        self._watchers = [w for w in self._watchers if w.is_alive()] + [watcher]
    if not self._async:
      self._settle()
    return saved

  def _manifest_when_saved(self, step: int) -> None:
    """Watcher thread: once orbax is done, the manifest of `step` if it was finalised.

    A failed save leaves no final step directory (orbax renames only complete ones): nothing to
    do here; the main thread reports the error at its next poll/save/wait.
    """
    while self._manager.is_saving_in_progress():
      time.sleep(0.05)
    try:
      self._write_manifest(step)
    except OSError as e:  # e.g. the disk filled up meanwhile; _settle retries and reports
      logging.info('manifest of step %d not written yet: %s', step, e)

  def _write_manifest(self, step: int) -> None:
    step_dir = os.path.join(self.directory, str(step))
    with self._manifest_lock:
      if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, MANIFEST)):
        write_manifest(step_dir)

  def poll(self) -> None:
    """Writes the manifest of a finished asynchronous save; never blocks on one in progress."""
    if self._unverified and not self._manager.is_saving_in_progress():
      self._settle()

  def wait(self) -> None:
    """Blocks until pending saves are on disk with their manifests."""
    self._settle()

  def close(self) -> None:
    """wait(), then releases orbax's threads. After a reported failure it only releases."""
    try:
      if self._failed is None:
        self._settle()
    finally:
      for watcher in self._watchers:
        watcher.join()
      self._watchers = []
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if self._failed is None:
          raise self._fail(e, None) from None

  def _settle(self) -> None:
    if self._failed is not None:
      raise self._failed
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(e, self._unverified[-1] if self._unverified else None) from None
    if _is_primary():
      for step in self._unverified:  # (a step removed by max_to_keep meanwhile is skipped)
        try:
          self._write_manifest(step)
        except OSError as e:
          raise self._fail(e, step) from None
    self._unverified = []

  def _fail(self, error: BaseException, step: int | None) -> CheckpointWriteError:
    logging.error('checkpoint save failed: %r', error)
    self._failed = CheckpointWriteError(_write_failure(error, self.directory, step))
    self._unverified = []
    if _is_primary():
      _remove_temporary(self.directory, step)
    return self._failed

  # ---- restoring ----
  def _restore_step(self, target: Any, step: int) -> tuple[Any, dict]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    # orbax restores a saved array of another shape into the target without a word.
    want = {name: np.shape(leaf) for name, leaf in _flatten(target)}
    got = {name: np.shape(leaf) for name, leaf in _flatten(restored['state'])}
    for name in sorted(set(want) | set(got)):
      if want.get(name) != got.get(name):
        raise ValueError(f'leaf {name!r} has shape {got.get(name)} in the checkpoint, '
                         f'{want.get(name)} in the model')
    return restored['state'], dict(restored['data'] or {})

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """(state shaped like `target_state`, iterator state, step); newest verified by default.

    Read-only: damaged steps are skipped with a warning (restore_latest moves them aside).
    """
    step = resolve_step(self.directory, step)
    target = jax.tree_util.tree_map(np.asarray, jax.device_get(target_state))
    try:
      state, data = self._restore_step(target, step)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint step {step} under {self.directory} is intact but does '
                            f'not fit the target: {_first_line(e)}') from None
    return state, data, step

  def restore_latest(self, target_state: Any) -> tuple[Any, dict, int] | None:
    """Resume: the newest good checkpoint as (state, iterator state, step); None if none saved.

    Each damaged or incomplete step (its files do not match its manifest) is named in a warning
    and moved to <workdir>/checkpoints_damaged/, newest first. Raises CheckpointDamagedError
    naming the directory when steps existed but none was usable, and CheckpointError when the
    newest good step does not fit `target_state` (its bytes are intact: another model or config
    wrote it; nothing is moved).
    """
    target = jax.tree_util.tree_map(np.asarray, jax.device_get(target_state))
    damaged = []
    good = None
    for step in reversed(_step_dirs(self.directory)):
      reason = verify_step(os.path.join(self.directory, str(step)))
      if reason is None:
        good = step
        break
      damaged.append((step, reason))
    if damaged:
      _sync('nsmae_checkpoint_verify')  # every process has judged before any step moves
      for step, reason in damaged:
        moved = _quarantine(self.directory, step) if _is_primary() else damaged_dir(self.workdir)
        _warn(f'checkpoint step {step} under {self.directory} is damaged or incomplete: '
              f'{reason}; moved to {moved}')
      _sync('nsmae_checkpoint_quarantine')
      self._manager.reload()
    if good is None:
      if damaged:
        raise CheckpointDamagedError(
            f'no usable checkpoint left under {self.directory}: '
            + '; '.join(f'step {s}: {r}' for s, r in damaged)
            + f'. They were moved to {damaged_dir(self.workdir)}; rerun to start from step 0, '
            'or restore a good copy into the checkpoint directory.')
      return None
    try:
      state, data = self._restore_step(target, good)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint step {good} under {self.directory} is intact (checksums match) but does '
          f'not fit this model: {_first_line(e)}. Was this work dir written with other model '
          'settings? Use another --workdir, or the settings it was written with.') from None
    return state, data, good


def resolve_step(directory: str, step: int | None) -> int:
  """`step` if it verifies, else raises; None -> the newest step that verifies (warns on skips)."""
  steps = _step_dirs(directory)
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {directory} (expected <workdir>/checkpoints/'
                            '<step>/ written by experiments.pretrain)')
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} under {directory}; have {steps}')
    reason = verify_step(os.path.join(directory, str(step)))
    if reason:
      raise CheckpointDamagedError(f'checkpoint step {step} under {directory} is damaged: '
                                   f'{reason}')
    return step
  skipped = []
  for s in reversed(steps):
    reason = verify_step(os.path.join(directory, str(s)))
    if reason is None:
      for bad, why in skipped:
        _warn(f'skipping damaged checkpoint step {bad} under {directory}: {why}')
      return s
    skipped.append((s, reason))
  raise CheckpointDamagedError(f'no usable checkpoint under {directory}: ' + '; '.join(
      f'step {s}: {r}' for s, r in skipped))


def read_raw(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The saved state as a raw nested dict of numpy arrays (no target needed), and its step."""
  directory = checkpoint_dir(workdir)
  step = resolve_step(directory, step)
  path = os.path.join(directory, str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  return tree, step


def restore_subtree(workdir: str, target: Any, prefix: tuple[str, ...] = ('params', 'backbone'),
                    step: int | None = None) -> tuple[Any, int]:
  """Restores only `state[prefix...]` of a pre-training checkpoint, shaped like `target`.

  This is the partial restore fine-tuning uses: `target` is e.g. a fresh model's
  `params['backbone']`; every leaf must exist in the checkpoint with the same shape, else a
  ValueError names the leaf. Returns (restored subtree as numpy, step).
  """
  directory = checkpoint_dir(workdir)
  step = resolve_step(directory, step)
  path = os.path.join(directory, str(step), 'state')
  target = jax.tree_util.tree_map(np.asarray, jax.device_get(target))
  full_target = target
  for key in reversed(prefix):
    full_target = {key: full_target}
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta_tree = getattr(meta, 'item_metadata', meta)
    meta_tree = getattr(meta_tree, 'tree', meta_tree)
    _check_against_metadata(meta_tree, full_target, path)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=full_target, restore_args=ocp.checkpoint_utils.construct_restore_args(full_target),
        partial_restore=True))
  for key in prefix:
    restored = restored[key]
  return restored, step


def _check_against_metadata(meta: Any, target: Any, path: str) -> None:
  """Raises ValueError naming the first target leaf missing from, or mis-shaped in, `meta`."""
  flat_target = dict(_flatten(target))
  flat_meta = dict(_flatten(meta))
  for name, leaf in flat_target.items():
    if name not in flat_meta:
      raise ValueError(f'{path}: checkpoint has no leaf {name!r} (is this a pre-training '
                       'checkpoint of the same model size?)')
    shape = getattr(flat_meta[name], 'shape', None)
    if shape is not None and tuple(shape) != tuple(np.shape(leaf)):
      raise ValueError(f'{path}: leaf {name!r} has shape {tuple(shape)} in the checkpoint, '
                       f'{tuple(np.shape(leaf))} in the model')


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flatten(tree: Any):
  """(slash/separated/path, leaf) pairs of any pytree (dicts, lists, tuples, dataclasses)."""
  is_leaf = lambda x: x is None or hasattr(x, 'shape')  # noqa: E731 (metadata leaves too)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  for path, leaf in leaves:
    if leaf is not None:
      yield '/'.join(_key_name(k) for k in path), leaf


def describe(workdir: str, step: int | None = None) -> list[tuple[str, tuple[int, ...], str]]:
  """(leaf path, shape, dtype) for every leaf of a checkpoint's state."""
  tree, _ = read_raw(workdir, step)
  return [(name, tuple(np.shape(v)), str(np.asarray(v).dtype)) for name, v in _flatten(tree)]
