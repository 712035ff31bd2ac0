"""orbax checkpoints: the train state and the data iterator position saved together.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. `state` is the (host, unreplicated) train
state as a pytree; `data` is the input iterator's JSON state, so a resumed run continues with the
exact batches it would have seen. Saves are asynchronous; orbax writes into a temporary directory
and renames on completion, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """One CheckpointManager for a run's workdir."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves host `state` (numpy pytree) and the iterator state at `step` (asynchronously)."""
    state = jax.device_get(state)
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
                              force=force)

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores (state shaped like `target_state`, iterator state, step); latest by default."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {self.directory}')
    target = jax.tree_util.tree_map(np.asarray, jax.device_get(target_state))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'] or {}), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _resolve_step(directory: str, step: int | None) -> int:
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {directory} (expected <workdir>/checkpoints/'
                            '<step>/ written by experiments.pretrain)')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} under {directory}; have {steps}')
  return step


def read_raw(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The saved state as a raw nested dict of numpy arrays (no target needed), and its step."""
  directory = checkpoint_dir(workdir)
  step = _resolve_step(directory, step)
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
  step = _resolve_step(directory, step)
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
