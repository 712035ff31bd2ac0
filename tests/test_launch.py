"""experiments.launch: which processes re-execute themselves with huge-page malloc (and jemalloc
where the system has it), and that an entry point really runs with them."""

from __future__ import annotations

import os

import pytest

from experiments import launch

PY = '/usr/bin/python3'
LINUX = dict(system='Linux', libc='glibc', find=lambda environ: None)  # no jemalloc
JE = '/opt/lib/libjemalloc.so.2'


def test_entry_module_reads_dash_m_after_interpreter_options():
  assert launch.entry_module([PY, '-m', 'experiments.pretrain', '--flagfile=x']) == \
      'experiments.pretrain'
  assert launch.entry_module([PY, '-u', '-X', 'dev', '-W', 'ignore', '-m',
                              'experiments.benchmark', '-X']) == 'experiments.benchmark'
  assert launch.entry_module([PY, 'script.py', '-m', 'experiments.pretrain']) is None
  assert launch.entry_module([PY, '-c', 'pass']) is None
  assert launch.entry_module([PY, '-c', '-m']) is None
  assert launch.entry_module([PY, '-m']) is None
  assert launch.entry_module([PY]) is None
  assert launch.entry_module([]) is None


def test_relaunch_env_adds_the_tunable_to_entry_points_only():
  argv = [PY, '-m', 'experiments.pretrain', '--flagfile=experiments/configs/demo.flags']
  env = launch.relaunch_env({'PATH': '/bin', 'XLA_FLAGS': '--a'}, argv, **LINUX)
  assert env == {'PATH': '/bin', 'XLA_FLAGS': '--a', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # Existing tunables are kept, the new one appended with glibc's ':' separator.
  env = launch.relaunch_env({'GLIBC_TUNABLES': 'glibc.malloc.check=0'}, argv, **LINUX)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.check=0:glibc.malloc.hugetlb=1'
  # The re-executed process (or a user's own choice, even =0) is left alone: no loop.
  assert launch.relaunch_env({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, argv, **LINUX) is None
  assert launch.relaunch_env(env, argv, **LINUX) is None
  # Switched off, not Linux/glibc, or not an experiments entry point: nothing to do.
  assert launch.relaunch_env({'NSMAE_HUGEPAGE_MALLOC': '0'}, argv, **LINUX) is None
  assert launch.relaunch_env({}, argv, system='Darwin', libc='') is None
  assert launch.relaunch_env({}, argv, system='Linux', libc='') is None
  assert launch.relaunch_env({}, [PY, '-m', 'pytest'], **LINUX) is None
  assert launch.relaunch_env({}, [PY, '-c', 'import experiments'], **LINUX) is None


def test_relaunch_env_preloads_jemalloc_when_found():
  argv = [PY, '-m', 'experiments.benchmark']
  found = dict(LINUX, find=lambda environ: JE)
  env = launch.relaunch_env({'PATH': '/bin'}, argv, **found)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'LD_PRELOAD': JE,
                 'MALLOC_CONF': launch.JEMALLOC_CONF}
  # A user's own preload (tcmalloc on a TPU VM) or jemalloc options are kept as they are.
  env = launch.relaunch_env({'LD_PRELOAD': '/x/libtcmalloc.so.4'}, argv, **found)
  assert env['LD_PRELOAD'] == '/x/libtcmalloc.so.4' and 'MALLOC_CONF' not in env
  env = launch.relaunch_env({'MALLOC_CONF': 'narenas:2'}, argv, **found)
  assert env['LD_PRELOAD'] == JE and env['MALLOC_CONF'] == 'narenas:2'
  # Not found: glibc's tunable alone, as before.
  assert launch.relaunch_env({}, argv, **LINUX) == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def test_find_jemalloc_searches_dirs_and_honours_the_switch(tmp_path):
  lib = tmp_path / 'b' / launch.JEMALLOC_NAME
  lib.parent.mkdir()
  lib.write_bytes(b'')
  dirs = (str(tmp_path / 'a'), str(lib.parent))
  assert launch.find_jemalloc({}, dirs) == str(lib)
  assert launch.find_jemalloc({}, dirs[:1]) is None
  assert launch.find_jemalloc({launch.JEMALLOC_SWITCH: '0'}, dirs) is None
  assert launch.find_jemalloc({launch.JEMALLOC_SWITCH: str(lib)}, ()) == str(lib)
  with pytest.raises(ValueError, match='NSMAE_JEMALLOC=.*nope.*no such file'):
    launch.find_jemalloc({launch.JEMALLOC_SWITCH: str(tmp_path / 'nope')}, dirs)


def test_host_allocator_reads_the_process_maps(tmp_path):
  maps = tmp_path / 'maps'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n')
  assert launch.host_allocator(str(maps)) == 'jemalloc'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n')
  assert launch.host_allocator(str(maps)) in ('glibc', 'default')


_PROBE = '''import os, sys
import numpy as np
from experiments import launch
def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
blocks = [np.ones(2 ** 24) for _ in range(4)]  # 512 MiB, freed again
del blocks
released = launch.release_free_memory() and rss() - base < 2 ** 27
print(os.environ.get("GLIBC_TUNABLES"), launch.host_allocator(), released, sys.argv[1:])
'''


@pytest.mark.slow
def test_entry_point_runs_with_hugepage_malloc(tmp_path):
  """`python -m experiments.<name>` re-executes once with the tunable (and jemalloc, where this
  machine has it) and keeps its arguments; NSMAE_JEMALLOC=0 keeps glibc, NSMAE_HUGEPAGE_MALLOC=0
  the plain process. Either way release_free_memory hands 512 MiB just freed back to the kernel
  (jemalloc under JEMALLOC_CONF keeps it otherwise)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  probe = os.path.join(root, 'experiments', '_launch_probe_test.py')
  with open(probe, 'w') as f:
    f.write(_PROBE)
  try:
    env = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', 'MALLOC_CONF', launch.SWITCH,
                        launch.JEMALLOC_SWITCH)}
    run = lambda extra: launch.run_entry_point(
        'experiments._launch_probe_test', ['a', '--b=c'], cwd=root, env={**env, **extra},
        capture_output=True, text=True, check=True, timeout=60).stdout
    allocator = 'jemalloc' if launch.find_jemalloc({}) else 'glibc'
    assert run({}).strip() == f"glibc.malloc.hugetlb=1 {allocator} True ['a', '--b=c']"
    assert run({launch.JEMALLOC_SWITCH: '0'}).strip() == \
        "glibc.malloc.hugetlb=1 glibc True ['a', '--b=c']"
    assert run({launch.SWITCH: '0'}).strip() == "None glibc True ['a', '--b=c']"
  finally:
    os.remove(probe)
