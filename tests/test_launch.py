"""experiments.launch: which processes re-execute themselves with huge-page malloc, and that an
entry point really runs with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments import launch

PY = '/usr/bin/python3'
LINUX = dict(system='Linux', libc='glibc')


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


@pytest.mark.slow
def test_entry_point_runs_with_hugepage_malloc(tmp_path):
  """`python -m experiments.<name>` re-executes once with the tunable and keeps its arguments;
  NSMAE_HUGEPAGE_MALLOC=0 keeps the plain process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  probe = os.path.join(root, 'experiments', '_launch_probe_test.py')
  with open(probe, 'w') as f:
    f.write('import os, sys\nprint(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])\n')
  try:
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', launch.SWITCH)}
    run = lambda extra: subprocess.run(
        [sys.executable, '-m', 'experiments._launch_probe_test', 'a', '--b=c'], cwd=root,
        env={**env, **extra}, capture_output=True, text=True, check=True, timeout=60).stdout
    assert run({}).strip() == "glibc.malloc.hugetlb=1 ['a', '--b=c']"
    assert run({launch.SWITCH: '0'}).strip() == "None ['a', '--b=c']"
  finally:
    os.remove(probe)
