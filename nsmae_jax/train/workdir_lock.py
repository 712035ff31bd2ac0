"""One run per work dir: a lock file naming the process (pid, host) that holds it.

Two runs on one work dir would interleave checkpoints and metrics.jsonl lines. The lock is a file
created with O_EXCL holding the owner's pid, host and process start time. A second run refuses
with WorkdirLockedError naming the owner. A lock whose owner is gone (its pid is dead on this
host, or now belongs to a process started later: pids are reused, e.g. in a restarted container)
is stale: it is taken over with a warning. A lock held from another host cannot be checked from
here; the message says to delete it if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from absl import logging


class WorkdirLockedError(RuntimeError):
  """Another live process holds the work dir's lock; the message names it."""


def _start_ticks(pid: int) -> int | None:
  """The process' start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat[stat.rindex(')') + 2:].split()  # after "pid (comm) "; comm may hold spaces
  return int(fields[19]) if fields[0] != 'Z' else None  # a zombie has exited


def _alive(owner: dict) -> bool:
  """Whether the lock's owner still runs (assumed so when it is on another host)."""
  if owner.get('host') != socket.gethostname():
    return True
  pid = int(owner.get('pid', -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's live process
  ticks = _start_ticks(pid)
  if ticks is None:
    return os.path.exists(f'/proc/{pid}') or not os.path.isdir('/proc')
  return owner.get('start_ticks') in (None, ticks)


class WorkdirLock:
  """Context manager holding `<workdir>/<name>` for this process."""

  def __init__(self, workdir: str, name: str = 'run.lock'):
    self.path = os.path.join(os.path.abspath(workdir), name)
    self._held = False

  def _me(self) -> dict:
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'start_ticks': _start_ticks(os.getpid()),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'argv': sys.argv[:8]}

  def _read(self) -> dict | None:
    """The owner record, or None while it is being written (empty or partial)."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return {}
    except ValueError:
      return None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    deadline = time.time() + 5.0
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read()
        if owner is None and time.time() < deadline:  # its owner is writing it right now
          time.sleep(0.05)
          continue
        owner = owner or {}
        if owner and _alive(owner):
          raise WorkdirLockedError(
              f'{os.path.dirname(self.path)} is in use by another run: pid {owner.get("pid")} '
              f'on host {owner.get("host")} (started {owner.get("started")}, command '
              f'{" ".join(owner.get("argv") or [])}) holds {self.path}. Wait for it or stop it, '
              'or use another work dir; if that process is gone, delete the lock file.'
          ) from None
        message = (f'taking over the stale lock {self.path} of pid {owner.get("pid")} on host '
                   f'{owner.get("host")} (that process no longer runs)')
        logging.info('%s', message)  # absl would print a warning to stderr a second time
        print(f'WARNING: {message}', file=sys.stderr, flush=True)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(self._me(), f)
      self._held = True
      return

  def release(self) -> None:
    """Removes the lock file if this process still owns it."""
    if not self._held:
      return
    self._held = False
    owner = self._read() or {}
    if owner.get('pid') == os.getpid() and owner.get('host') == socket.gethostname():
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
