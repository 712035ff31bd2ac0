"""Huge pages for the host allocator of the entry points (`python -m experiments.<name>`).

XLA:CPU allocates each step's buffers afresh; with glibc's default malloc the large ones are
mmap'd, touched page by page and unmapped again, so every step pays one page fault per 4 KiB of
temporaries. Measured on the demo pre-training step (2 idle cores, experiments.benchmark's
step): 62k minor page faults and 130 ms of kernel time per step; with glibc's
`glibc.malloc.hugetlb=1` tunable (malloc asks for transparent huge pages) about 500 faults,
30 ms, and the step 0.30 -> 0.21 s (README, Benchmarks). The tunable is read when the process
starts, so an entry point started without it re-executes itself once with it added to
GLIBC_TUNABLES (before anything heavy is imported: experiments/__init__.py calls this).

Off with NSMAE_HUGEPAGE_MALLOC=0. Nothing happens off Linux, under another libc, when
GLIBC_TUNABLES already says something about glibc.malloc.hugetlb (so the re-executed process
never loops), or when the process was not started as `python -m experiments.<name>` (imports
from tests, notebooks and other programs are left alone). The kernel must allow transparent
huge pages (`/sys/kernel/mm/transparent_hugepage/enabled` not `[never]`); otherwise the tunable
is harmless and changes nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

TUNABLE = 'glibc.malloc.hugetlb'
SWITCH = 'NSMAE_HUGEPAGE_MALLOC'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def entry_module(argv: Sequence[str]) -> str | None:
  """The module a `python [options] -m <module> ...` command line runs, else None."""
  args = iter(argv[1:])
  for arg in args:
    if arg == '-m':
      return next(args, None)
    if arg in _VALUE_OPTIONS:
      next(args, None)
    elif arg == '-c' or not arg.startswith('-'):  # a command or a script path: not a -m run
      return None
  return None


_VALUE_OPTIONS = ('-X', '-W', '--check-hash-based-pycs')  # interpreter options with a value


def relaunch_env(environ: Mapping[str, str], argv: Sequence[str],
                 system: str | None = None, libc: str | None = None) -> dict[str, str] | None:
  """The environment to re-execute `argv` with (GLIBC_TUNABLES gaining glibc.malloc.hugetlb=1),
  or None when the process should run as it is (see the module docstring for when)."""
  module = entry_module(argv)
  if module is None or not module.startswith('experiments.'):
    return None
  if environ.get(SWITCH, '1') == '0':
    return None
  system = platform.system() if system is None else system
  libc = platform.libc_ver()[0] if libc is None else libc
  if system != 'Linux' or libc != 'glibc':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return env


def maybe_relaunch() -> None:
  """Re-executes this process with huge-page malloc when relaunch_env says so (never returns
  then); otherwise returns at once."""
  argv = list(getattr(sys, 'orig_argv', []))
  env = relaunch_env(os.environ, argv)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def hugepage_malloc_active() -> bool:
  """Whether this process runs with glibc.malloc.hugetlb=1 and the kernel allows transparent
  huge pages (the benchmark reports it beside its timings)."""
  if f'{TUNABLE}=1' not in os.environ.get('GLIBC_TUNABLES', ''):
    return False
  try:
    with open(_THP) as f:
      return '[never]' not in f.read()
  except OSError:
    return False
