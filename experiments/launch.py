"""The host allocator of the entry points (`python -m experiments.<name>`): jemalloc with
transparent huge pages where the system has it, else glibc's malloc with huge pages.

XLA:CPU allocates each call's temporaries afresh (the demo train step's temp is 203 MB, mapped
and unmapped on every call). With glibc's default malloc those buffers are mmap'd, touched page
by page and unmapped again, so every step pays one page fault per 4 KiB of temporaries. Measured
on the demo pre-training step (2 idle cores, experiments.benchmark's step): 62k minor page faults
and 130 ms of kernel time per step; with glibc's `glibc.malloc.hugetlb=1` tunable (malloc asks
for transparent huge pages) about 500 faults, 30 ms, and the step 0.30 -> 0.21 s (README,
Benchmarks). glibc still maps each buffer afresh (a thread on a non-main arena maps any request
above 64 MiB, whatever its tunables say), so the kernel zeroes ~100 fresh 2 MiB pages a step:
`clear_page_erms` was 7% of the whole process's CPU samples under `perf record` (session 19).

jemalloc (Debian/Ubuntu package libjemalloc2), preloaded with MALLOC_CONF=`JEMALLOC_CONF`
(huge pages, freed pages kept for reuse instead of returned to the kernel), maps those buffers
once and reuses them: 2-9 minor faults a step instead of ~500, kernel time 3-27 instead of
32-53 ms a step, and the step faster in 13 of 19 adjacent process pairs, median -7% (session 19,
AMD EPYC Zen 4, 2 cores; docs/cpu_performance.md). The cost: the process keeps its high-water
mark of freed memory (peak RSS of the demo step 1.4 instead of 1.1 GB) until it exits or calls
`release_free_memory`.

Both are set when the process starts, so an entry point started without them re-executes itself
once (before anything heavy is imported: experiments/__init__.py calls this) with
GLIBC_TUNABLES gaining glibc.malloc.hugetlb=1 and, when `find_jemalloc` finds the library,
LD_PRELOAD and MALLOC_CONF. A user's own LD_PRELOAD (tcmalloc on a TPU VM, say) or MALLOC_CONF
is kept as it is. `NSMAE_JEMALLOC=0` keeps glibc; `NSMAE_JEMALLOC=<path>` names the library.

Off with NSMAE_HUGEPAGE_MALLOC=0 (neither). Nothing happens off Linux, under another libc, when
GLIBC_TUNABLES already says something about glibc.malloc.hugetlb (so the re-executed process
never loops), or when the process was not started as `python -m experiments.<name>` (imports
from tests, notebooks and other programs are left alone). The kernel must allow transparent
huge pages (`/sys/kernel/mm/transparent_hugepage/enabled` not `[never]`); otherwise both are
harmless and the huge pages do not happen.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Mapping, Sequence

TUNABLE = 'glibc.malloc.hugetlb'
SWITCH = 'NSMAE_HUGEPAGE_MALLOC'
JEMALLOC_SWITCH = 'NSMAE_JEMALLOC'
# thp:always: jemalloc's own mappings get transparent huge pages; dirty_decay_ms / muzzy_decay_ms
# -1: freed pages are never returned to the kernel, so the next step reuses them already mapped.
# (With oversize_threshold:0 and the default 10 s decay: 103 faults a step; 30 s: 19-29.)
JEMALLOC_CONF = 'thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1'
JEMALLOC_NAME = 'libjemalloc.so.2'
# Where Debian/Ubuntu (multiarch), Fedora/RHEL and source builds put it.
JEMALLOC_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                 '/usr/lib', '/usr/local/lib')
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


def find_jemalloc(environ: Mapping[str, str],
                  dirs: Sequence[str] = JEMALLOC_DIRS) -> str | None:
  """The jemalloc library to preload: NSMAE_JEMALLOC's path if set (ValueError naming it when
  it is not a file), None if it is '0', else the first `dirs`/libjemalloc.so.2 that exists."""
  choice = environ.get(JEMALLOC_SWITCH, '')
  if choice == '0':
    return None
  if choice:
    if not os.path.isfile(choice):
      raise ValueError(f'{JEMALLOC_SWITCH}={choice!r}: no such file (a path to '
                       f'{JEMALLOC_NAME}, or 0 to keep glibc malloc)')
    return choice
  for d in dirs:
    path = os.path.join(d, JEMALLOC_NAME)
    if os.path.isfile(path):
      return path
  return None


def relaunch_env(environ: Mapping[str, str], argv: Sequence[str],
                 system: str | None = None, libc: str | None = None,
                 find: Callable[[Mapping[str, str]], str | None] = find_jemalloc
                 ) -> dict[str, str] | None:
  """The environment to re-execute `argv` with (GLIBC_TUNABLES gaining glibc.malloc.hugetlb=1;
  LD_PRELOAD and MALLOC_CONF for the library `find(environ)` returns, unless LD_PRELOAD is
  already set), or None when the process should run as it is (the module docstring says when)."""
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
  library = None if environ.get('LD_PRELOAD') else find(environ)
  if library:
    env['LD_PRELOAD'] = library
    env.setdefault('MALLOC_CONF', JEMALLOC_CONF)
  return env


def maybe_relaunch() -> None:
  """Re-executes this process with the allocator settings relaunch_env gives (never returns
  then); otherwise returns at once."""
  argv = list(getattr(sys, 'orig_argv', []))
  env = relaunch_env(os.environ, argv)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def host_allocator(maps: str = '/proc/self/maps') -> str:
  """'jemalloc' when libjemalloc is loaded in this process, else 'glibc' on Linux/glibc, else
  the platform's default ('default'); the benchmark reports it beside its timings."""
  try:
    with open(maps) as f:
      if 'libjemalloc' in f.read():
        return 'jemalloc'
  except OSError:
    pass
  return 'glibc' if platform.libc_ver()[0] == 'glibc' else 'default'


def release_free_memory() -> bool:
  """Hands the host allocator's free pages back to the kernel: all of jemalloc's arenas purged
  (`mallctl("arena.4096.purge")`), or glibc's `malloc_trim(0)`. Call it before starting a
  memory-hungry child process: under JEMALLOC_CONF this process otherwise keeps its high-water
  mark (the benchmark, at ~15 GB after the full.flags twin, and its 9 GB `--twin_alone` child
  did not fit in 24 GB together). -> whether the call was made."""
  import ctypes  # pylint: disable=import-outside-toplevel
  allocator = host_allocator()
  if allocator == 'default':
    return False
  process = ctypes.CDLL(None)  # the preloaded jemalloc's symbols are global
  if allocator == 'jemalloc':
    mallctl = process.mallctl
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_size_t]
    return mallctl(b'arena.4096.purge', None, None, None, 0) == 0  # 4096: every arena
  process.malloc_trim(0)
  return True


def run_entry_point(module: str, args: Sequence[str] = (), **kwargs):
  """subprocess.run([python, '-m', module, *args], **kwargs) after `release_free_memory`, so that
  this process's freed pages are the kernel's again before the child needs its own (the
  benchmark's memory_report and --twin_alone children, label_efficiency's cells)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  release_free_memory()
  return subprocess.run([sys.executable, '-m', module, *args], **kwargs)  # pylint: disable=subprocess-run-check


def _thp_allowed() -> bool:
  try:
    with open(_THP) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def hugepage_malloc_active() -> bool:
  """Whether this process's host allocator asks for transparent huge pages and the kernel
  allows them: jemalloc with thp:always in MALLOC_CONF, or glibc with glibc.malloc.hugetlb=1
  (the benchmark reports it beside its timings)."""
  if host_allocator() == 'jemalloc':
    asked = 'thp:always' in os.environ.get('MALLOC_CONF', '')
  else:
    asked = f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')
  return asked and _thp_allowed()
