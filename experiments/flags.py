"""The one absl flags module: a flag per field of nsmae_jax.config, grouped by config section.

Flags are generated from the dataclass fields (name, default, type, help), so the config and the
command line cannot drift apart. `--flagfile=experiments/configs/<name>.flags` works, and a
flagfile may include another with its own `--flagfile=` line (paths relative to the working
directory, as absl resolves them). Entry points call `config_from_flags()` inside `main` and get
a validated `Config`; a bad value exits with one line naming the flag.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from nsmae_jax import config as config_lib

FLAGS = flags.FLAGS

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}
_TYPES = {'bool': bool, 'int': int, 'float': float, 'str': str}


def _define_all(flag_values: flags.FlagValues = FLAGS) -> None:
  for group, field in config_lib.all_fields():
    if field.name in flag_values:
      continue
    kind = _TYPES[field.type] if isinstance(field.type, str) else field.type
    _DEFINE[kind](field.name, field.default, field.metadata['help'],
                  module_name=f'nsmae_jax.config.{group}', flag_values=flag_values)


_define_all()


def config_from_flags(check_files: bool = True, **overrides) -> config_lib.Config:
  """A validated Config from the parsed flags (plus keyword overrides by field name); with
  check_files, also the file-system checks of check_paths (off for tools that read no data).

  Raises config_lib.ConfigError('--flag: problem') on a bad value; `run()` turns it into a
  one-line error and a non-zero exit.
  """
  return _config(FLAGS, check_files, **overrides)


def config_from_flagfile(path: str) -> config_lib.Config:
  """The validated Config of a flagfile (includes followed), parsed on a private FlagValues so
  the process's own flags are untouched; no file-system checks."""
  fv = flags.FlagValues()
  _define_all(fv)
  fv(['config_from_flagfile', f'--flagfile={path}'])
  return _config(fv, check_files=False)


def _config(flag_values: flags.FlagValues, check_files: bool, **overrides) -> config_lib.Config:
  values = {field.name: flag_values[field.name].value for _, field in config_lib.all_fields()}
  values.update(overrides)
  config = config_lib.Config().replace(**values).validate()
  return check_paths(config) if check_files else config


def check_paths(config: config_lib.Config) -> config_lib.Config:
  """The file-system checks of a config (the config's own checks know no files); returns it."""
  import os  # pylint: disable=import-outside-toplevel
  init = config.finetune.init_workdir
  if init and not os.path.isdir(init):
    raise config_lib.ConfigError(f'--init_workdir: directory {init!r} does not exist (give a '
                                 'pre-training workdir, or an empty value for scratch)')
  d = config.data
  if not d.synthetic and not os.path.isdir(d.data_dir):
    raise config_lib.ConfigError(f'--data_dir: directory {d.data_dir!r} does not exist (pass '
                                 '--synthetic to generate the demo world there)')
  return config


def run(main: Callable[[Sequence[str]], None]) -> None:
  """absl app.run(main) that reports a ConfigError as `error: --flag: problem` and exits 2."""

  def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      print(f'error: unexpected positional arguments {list(argv[1:])}', file=sys.stderr)
      sys.exit(2)
    if not FLAGS['verbosity'].present:  # orbax/jax INFO logs drown the progress lines
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except config_lib.ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(_main)


def flag_names() -> list[str]:
  """Every config flag name (for tests and tools)."""
  return [f.name for _, f in config_lib.all_fields()]


__all__ = ['FLAGS', 'check_paths', 'config_from_flagfile', 'config_from_flags', 'run', 'flag_names']


def adopt_into_main() -> None:
  """Makes the config flags key flags of the running entry point, so `--help` lists them."""
  for _, field in config_lib.all_fields():
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[field.name])
