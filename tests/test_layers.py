"""The import rules of DESIGN.md ("Data flow"), checked on the source: one-way layers, no loops.

Every import statement (ast, module level and inside functions) of every module under
nsmae_jax/, data_prep/ and experiments/ is resolved to the repository module it names and
checked against these layers, bottom -> top:

  0 bottom    nsmae_jax.config, nsmae_jax.geometry, nsmae_jax.data.{schema, naming, subsets}
  1 data      nsmae_jax.data (reading: shards, decoding, the pipeline, fake batches)
  2 models    nsmae_jax.models
  3 render    nsmae_jax.render
  4 tasks     nsmae_jax.pretrain | nsmae_jax.finetune (siblings: neither imports the other)
  5 train     nsmae_jax.train (the generic loop: imports no pretrain/finetune module, the entry
              point hands it a task)
  6 viz       nsmae_jax.viz (a leaf helper for notebooks: no library module imports it)
  7 top       experiments (entry points: may import anything, nothing imports them)

A module imports only its own layer or layers below, with these readings:
- geometry imports no other nsmae_jax module.
- The tasks sit below train in this list but may import the task-facing pieces of train
  (TRAIN_API: the Task interface a task fills in, the pure steps (eval of a checkpoint), and
  checkpointing for the partial restore of a
  pre-trained encoder). They never import the loop (nsmae_jax.train, nsmae_jax.train.loop):
  running a task is the entry point's job, so train stays generic and the two never form a loop.
- A package's __init__ runs whenever any module under it is imported, so it belongs to the
  lowest layer of its modules (nsmae_jax/__init__.py and nsmae_jax/data/__init__.py are bottom:
  importing the schema must not import TensorFlow).
- data_prep stands beside the library, not in the chain: it may import only data_prep itself and
  DATA_PREP_MAY_IMPORT (the schema, the naming and the config); nothing under nsmae_jax imports
  data_prep; experiments may.
And no two top-level parts (nsmae_jax.<part>, data_prep, experiments) import each other,
directly or through a loop.

Dynamic imports (importlib) are not seen; the code has none.
"""

from __future__ import annotations

import ast
import os
from typing import Iterator, NamedTuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOTS = ('nsmae_jax', 'data_prep', 'experiments')

# Longest matching prefix wins.
LAYERS = {
    'nsmae_jax.config': 0, 'nsmae_jax.geometry': 0, 'nsmae_jax.data.schema': 0,
    'nsmae_jax.data.naming': 0, 'nsmae_jax.data.subsets': 0,
    'nsmae_jax.data': 1,
    'nsmae_jax.models': 2,
    'nsmae_jax.render': 3,
    'nsmae_jax.pretrain': 4, 'nsmae_jax.finetune': 4,
    'nsmae_jax.train': 5,
    'nsmae_jax.viz': 6,
    'experiments': 7,
}
LAYER_NAMES = ['bottom', 'data', 'models', 'render', 'tasks', 'train', 'viz', 'experiments']
TASKS = 4
TRAIN_API = ('nsmae_jax.train.task', 'nsmae_jax.train.checkpointing', 'nsmae_jax.train.steps')
DATA_PREP_MAY_IMPORT = ('nsmae_jax', 'nsmae_jax.config', 'nsmae_jax.data',
                        'nsmae_jax.data.schema', 'nsmae_jax.data.naming')


class Import(NamedTuple):
  importer: str  # module name, e.g. 'nsmae_jax.train.loop'
  target: str  # the repository module it names, e.g. 'nsmae_jax.data.pipeline'
  where: str  # 'path:line'
  statement: str  # the source line


def find_modules(repo: str = _REPO) -> dict[str, str]:
  """{module name: file path} of every .py file under the checked roots."""
  modules = {}
  for root in _ROOTS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(repo, root)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__pycache__')))
      for name in sorted(filenames):
        if not name.endswith('.py'):
          continue
        path = os.path.join(dirpath, name)
        parts = os.path.relpath(path, repo)[:-len('.py')].split(os.sep)
        if parts[-1] == '__init__':
          parts.pop()
        modules['.'.join(parts)] = path
  return modules


def _is_package(path: str) -> bool:
  return os.path.basename(path) == '__init__.py'


def imports_of(name: str, path: str, source: str, known: set[str]) -> Iterator[Import]:
  """The imports of module `name` (file `path`) that name a module in `known`, resolved to the
  deepest known module (`from a import b` names a.b when a.b is a module, else a)."""
  lines = source.splitlines()
  package = name if _is_package(path) else name.rpartition('.')[0]
  for node in ast.walk(ast.parse(source, path)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:
        target = target.rpartition('.')[0]
      if target:
        where = f'{os.path.relpath(path, _REPO)}:{node.lineno}'
        yield Import(name, target, where, lines[node.lineno - 1].strip())


def _prefix_layer(module: str) -> int | None:
  best = None
  for prefix, layer in LAYERS.items():
    if module == prefix or module.startswith(prefix + '.'):
      if best is None or len(prefix) > len(best):
        best = prefix
  return None if best is None else LAYERS[best]


def layer_of(module: str, modules: dict[str, str]) -> int | None:
  """The layer of a module; a package's is the lowest of its modules (its __init__ runs first).
  None for data_prep (beside the chain)."""
  if module.split('.')[0] == 'data_prep':
    return None
  if module in modules and _is_package(modules[module]):
    layers = [_prefix_layer(m) for m in modules if m == module or m.startswith(module + '.')]
    return min((l for l in layers if l is not None), default=0)
  return _prefix_layer(module)


def part_of(module: str) -> str:
  """The top-level part: nsmae_jax.<first component>, data_prep or experiments."""
  bits = module.split('.')
  return '.'.join(bits[:2]) if bits[0] == 'nsmae_jax' and len(bits) > 1 else bits[0]


def _describe(layer: int | None) -> str:
  return 'data_prep' if layer is None else f'layer {layer} ({LAYER_NAMES[layer]})'


def rule_violation(imp: Import, modules: dict[str, str]) -> str | None:
  """Why `imp` breaks the rules, or None."""
  src, dst = imp.importer, imp.target
  if src.split('.')[0] == 'data_prep':
    if dst.split('.')[0] == 'data_prep' or dst in DATA_PREP_MAY_IMPORT:
      return None
    return f'data_prep may import only {", ".join(DATA_PREP_MAY_IMPORT[1:])}'
  if dst.split('.')[0] == 'data_prep':  # the entry points prepare the data
    return None if src.split('.')[0] == 'experiments' else (
        'nothing under nsmae_jax imports data_prep')
  if part_of(src) == 'nsmae_jax.geometry' != part_of(dst):
    return 'geometry imports no other nsmae_jax module'
  lsrc, ldst = layer_of(src, modules), layer_of(dst, modules)
  if lsrc is None or ldst is None:
    return f'{src if lsrc is None else dst} has no layer: place it in LAYERS'
  if part_of(src) == 'nsmae_jax.train' and ldst == TASKS:
    return 'train imports no pretrain/finetune module (the entry point hands it a task)'
  if lsrc == TASKS and dst in TRAIN_API:
    return None
  if lsrc == ldst == TASKS and part_of(src) != part_of(dst):
    return 'pretrain and finetune are siblings: neither imports the other'
  if ldst > lsrc:
    hint = ''
    if lsrc == TASKS and ldst == LAYERS['nsmae_jax.train']:
      hint = f' (a task may import only {", ".join(TRAIN_API)} of train)'
    return f'{_describe(lsrc)} imports {_describe(ldst)} above it{hint}'
  return None


def violations(modules: dict[str, str], sources: dict[str, str] | None = None) -> list[str]:
  """One line per broken rule: 'path:line module imports target: why  [statement]'."""
  known = set(modules)
  found = []
  for name, path in sorted(modules.items()):
    source = sources[name] if sources is not None else open(path, encoding='utf-8').read()
    for imp in imports_of(name, path, source, known):
      why = rule_violation(imp, modules)
      if why:
        found.append(f'{imp.where} {imp.importer} imports {imp.target}: {why}  [{imp.statement}]')
  return found


def part_cycles(modules: dict[str, str], sources: dict[str, str] | None = None) -> list[str]:
  """One line per loop between top-level parts, with an import that makes each of its edges."""
  known = set(modules)
  edges: dict[str, dict[str, Import]] = {}
  for name, path in sorted(modules.items()):
    source = sources[name] if sources is not None else open(path, encoding='utf-8').read()
    for imp in imports_of(name, path, source, known):
      a, b = part_of(imp.importer), part_of(imp.target)
      if a != b:
        edges.setdefault(a, {}).setdefault(b, imp)
  cycles = []
  seen_sets = set()

  def walk(node: str, stack: list[str]) -> None:
    for nxt in sorted(edges.get(node, {})):
      if nxt in stack:
        loop = stack[stack.index(nxt):]
        key = frozenset(loop)
        if key not in seen_sets:
          seen_sets.add(key)
          hops = [(p, loop[(i + 1) % len(loop)]) for i, p in enumerate(loop)]
          cycles.append(' -> '.join(loop + [nxt]) + ': ' + '; '.join(
              f'{edges[a][b].where} {edges[a][b].importer} imports {edges[a][b].target}'
              for a, b in hops))
      else:
        walk(nxt, stack + [nxt])

  for start in sorted(edges):
    walk(start, [start])
  return cycles


def test_the_code_keeps_the_import_rules():
  modules = find_modules()
  assert 'nsmae_jax.train.loop' in modules and 'data_prep.prepare' in modules
  found = violations(modules)
  assert not found, 'imports against DESIGN.md "Data flow":\n' + '\n'.join(found)


def test_no_two_parts_import_each_other():
  found = part_cycles(find_modules())
  assert not found, 'import loops between parts:\n' + '\n'.join(found)


def test_every_library_module_has_a_layer():
  """A new top-level module or subpackage under nsmae_jax must be placed in LAYERS (and the
  module docstring's table) before it can be checked."""
  modules = find_modules()
  missing = [m for m in modules if m != 'nsmae_jax' and m.startswith('nsmae_jax')
             and _prefix_layer(m) is None]
  assert not missing, f'modules without a layer (add them to LAYERS): {missing}'


# The checker itself, on made-up modules: each rule fires, with file:line and the statement.

_FAKE = {
    'nsmae_jax': '',
    'nsmae_jax.geometry': 'import jax\n\ndef f():\n  from nsmae_jax import config\n',
    'nsmae_jax.config': '',
    'nsmae_jax.data': 'from nsmae_jax.data import pipeline\n',
    'nsmae_jax.data.schema': '',
    'nsmae_jax.data.pipeline': 'from nsmae_jax.data import schema\nfrom nsmae_jax import config\n',
    'nsmae_jax.models.backbone': 'from nsmae_jax.render import field\n',
    'nsmae_jax.render.field': 'from nsmae_jax.models.backbone import Backbone\n',
    'nsmae_jax.pretrain': 'from . import task\n',
    'nsmae_jax.pretrain.task': ('from nsmae_jax.train.task import Task\n'
                                'from nsmae_jax.train import loop\n'
                                'from ..finetune.head import Head\n'),
    'nsmae_jax.finetune.head': 'import nsmae_jax.models.backbone as b\n',
    'nsmae_jax.train.task': '',
    'nsmae_jax.train.loop': 'def run():\n  import nsmae_jax.pretrain.task\n',
    'nsmae_jax.viz': 'from nsmae_jax.geometry import project\n',
    'data_prep.convert': ('from nsmae_jax.data import schema\n'
                          'from nsmae_jax.data.pipeline import open_split\n'),
    'experiments.run': 'from data_prep import convert\nfrom nsmae_jax import viz\n',
    'nsmae_jax.newpart': '',
    'nsmae_jax.viz2': 'from nsmae_jax import newpart\n',
}


def _fake_modules() -> dict[str, str]:
  out = {}
  for name in _FAKE:
    package = any(m.startswith(name + '.') for m in _FAKE)
    out[name] = os.path.join(_REPO, *name.split('.'), '__init__.py') if package else (
        os.path.join(_REPO, *name.split('.')) + '.py')
  return out


def test_checker_flags_each_rule_on_made_up_modules():
  found = violations(_fake_modules(), _FAKE)
  short = sorted(line.split(' ', 1)[1].split('  [')[0] for line in found)
  assert short == sorted([
      'data_prep.convert imports nsmae_jax.data.pipeline: data_prep may import only '
      'nsmae_jax.config, nsmae_jax.data, nsmae_jax.data.schema, nsmae_jax.data.naming',
      'nsmae_jax.data imports nsmae_jax.data.pipeline: layer 0 (bottom) imports layer 1 (data) '
      'above it',
      'nsmae_jax.geometry imports nsmae_jax.config: geometry imports no other nsmae_jax module',
      'nsmae_jax.models.backbone imports nsmae_jax.render.field: layer 2 (models) imports '
      'layer 3 (render) above it',
      'nsmae_jax.pretrain.task imports nsmae_jax.finetune.head: pretrain and finetune are '
      'siblings: neither imports the other',
      'nsmae_jax.pretrain.task imports nsmae_jax.train.loop: layer 4 (tasks) imports layer 5 '
      '(train) above it (a task may import only nsmae_jax.train.task, '
      'nsmae_jax.train.checkpointing, nsmae_jax.train.steps of train)',
      'nsmae_jax.train.loop imports nsmae_jax.pretrain.task: train imports no pretrain/finetune '
      'module (the entry point hands it a task)',
      'nsmae_jax.viz2 imports nsmae_jax.newpart: nsmae_jax.viz2 has no layer: place it in LAYERS',
  ])
  # Lines name the file and line of the statement, also inside functions.
  assert any(line.startswith(os.path.join('nsmae_jax', 'geometry.py') + ':4 ')
             for line in found)


def test_cycle_check_names_each_loop_and_its_imports():
  found = part_cycles(_fake_modules(), _FAKE)
  assert [line.split(':')[0] for line in found] == [
      'nsmae_jax.models -> nsmae_jax.render -> nsmae_jax.models',
      'nsmae_jax.pretrain -> nsmae_jax.train -> nsmae_jax.pretrain']
  assert found[1].endswith('nsmae_jax.pretrain.task imports nsmae_jax.train.task; '
                           + os.path.join('nsmae_jax', 'train', 'loop.py')
                           + ':2 nsmae_jax.train.loop imports nsmae_jax.pretrain.task')
