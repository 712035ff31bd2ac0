r"""NS-MAE pre-training.

  python -m experiments.pretrain --flagfile=experiments/configs/demo.flags [--workdir=DIR]

On the demo flags a missing dataset is generated (synthetic nuScenes-format world) and converted
first. An existing workdir resumes from its newest good checkpoint (a damaged one is named and
moved aside); SIGTERM saves a checkpoint and exits; a second run on a workdir in use is
refused. All logic lives in nsmae_jax.train.train_and_evaluate with nsmae_jax.pretrain's task
(importable from notebooks).
"""

from experiments import data
from experiments import flags as nsflags
from nsmae_jax import train
from nsmae_jax.pretrain import pretrain_task


def main(argv):
  del argv
  config = nsflags.config_from_flags()
  task = pretrain_task(config)  # a bad model setting fails before any data preparation
  data.ensure_data(config)
  train.train_and_evaluate(config, config.train.workdir, task)


if __name__ == '__main__':
  nsflags.adopt_into_main()
  nsflags.run(main)
