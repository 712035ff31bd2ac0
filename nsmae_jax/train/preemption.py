"""SIGTERM (preemption) as a flag the training loop checks between steps.

The handler stays installed until the loop has finished its last checkpoint, so a SIGTERM that
arrives during a save, or a second SIGTERM (schedulers often repeat it), cannot kill the process
half-way through writing: the loop saves once at the current step and exits cleanly.
"""

from __future__ import annotations

import os
import signal


class Preemption:
  """Context manager: `requested` turns True on SIGTERM (main thread only; elsewhere inert)."""

  def __init__(self):
    self.requested = False
    self.signals = 0
    self._previous = None
    self._installed = False

  def __enter__(self) -> 'Preemption':
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread (some notebook kernels): SIGTERM keeps its default
      self._installed = False
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.requested = True
    self.signals += 1
    if self.signals > 1:
      # os.write, not print: the handler may interrupt a print in the main thread, and a
      # re-entrant write to sys.stderr's buffer raises.
      os.write(2, b'SIGTERM again: still finishing the checkpoint, then exiting\n')

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
