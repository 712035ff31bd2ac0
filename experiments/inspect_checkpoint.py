r"""Lists a checkpoint's contents: every leaf of the saved train state with shape and dtype.

  python -m experiments.inspect_checkpoint --workdir=runs/demo [--step=N] [--prefix=params/backbone]
"""

from absl import app
from absl import flags
from absl import logging
import numpy as np

from nsmae_jax.train import checkpointing

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.',
                               required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_PREFIX = flags.DEFINE_string('prefix', '', 'Only leaves under this path, e.g. params/backbone.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    leaves = checkpointing.describe(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:
    raise SystemExit(f'error: {e}') from None
  leaves = [leaf for leaf in leaves if leaf[0].startswith(_PREFIX.value)]
  width = max((len(name) for name, _, _ in leaves), default=10)
  total = 0
  for name, shape, dtype in leaves:
    total += int(np.prod(shape))
    print(f'{name:<{width}}  {str(shape):<22} {dtype}')
  steps = checkpointing.Checkpointer(_WORKDIR.value).all_steps()
  print(f'{len(leaves)} leaves, {total:,} values; checkpoints at steps {steps}')


if __name__ == '__main__':
  app.run(main)
