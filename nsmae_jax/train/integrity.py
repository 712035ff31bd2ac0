"""Checkpoint integrity: a manifest (size and sha256 of every file) written once a save is done.

orbax does not notice a damaged file: a flipped byte inside an uncompressed array chunk restores
silently as a wrong value. So the checkpointer records what it wrote and checks it before use.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = 'manifest.json'


def _step_files(step_dir: str) -> list[str]:
  """Relative paths of every file under step_dir except the manifest, sorted."""
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def write_manifest(step_dir: str) -> None:
  """Writes step_dir/manifest.json: {relative path: {'size', 'sha256'}} of every file.

  Written to a temporary name, fsynced and renamed, so a manifest is either whole or absent.
  """
  files = {rel: {'size': os.path.getsize(os.path.join(step_dir, rel)),
                 'sha256': _sha256(os.path.join(step_dir, rel))} for rel in _step_files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump({'files': files}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> str | None:
  """None if step_dir matches its manifest, else why not (missing manifest, file, size, hash)."""
  path = os.path.join(step_dir, MANIFEST)
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except FileNotFoundError:
    return f'no {MANIFEST} (the save did not finish, or it was written before manifests existed)'
  except (ValueError, KeyError, TypeError) as e:
    return f'unreadable {MANIFEST} ({e})'
  present = set(_step_files(step_dir))
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if rel not in present:
      return f'{rel} is missing'
    size = os.path.getsize(full)
    if size != want['size']:
      return f'{rel} has {size} bytes, {want["size"]} when saved (truncated?)'
    if _sha256(full) != want['sha256']:
      return f'{rel} differs from its saved sha256 (corrupted bytes)'
  extra = sorted(present - set(files))
  if extra:
    return f'unexpected file(s) {extra[:3]} not in {MANIFEST}'
  return None
