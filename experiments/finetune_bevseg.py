r"""BEV map segmentation fine-tuning (label-efficient), from a pre-trained NS-MAE backbone.

  python -m experiments.finetune_bevseg --flagfile=experiments/configs/bevseg_demo.flags \
      --init_workdir=runs/demo --label_fraction=0.05 --workdir=runs/bevseg_demo_5pct
  (--init_workdir='' trains the same model from scratch)

The backbone (LiDAR + camera encoders, lifting, fusion) is restored from the latest checkpoint
of --init_workdir; a BEVFusion-style head predicts the six map classes. Masking is off.
--label_fraction keeps a seeded (--subset_seed) subset of the training key frames; the number of
steps does not depend on it. The final eval (use --eval_batches=0 for the whole val split) prints
BEVFusion's per-class IoU (max over thresholds 0.35..0.65) and the mIoU, and writes them to
<workdir>/result.json. All logic lives in nsmae_jax.finetune (importable from notebooks).
"""

from experiments import data
from experiments import flags as nsflags
from nsmae_jax import train
from nsmae_jax.finetune.task import save_result
from nsmae_jax.finetune import bevseg_task, format_table


def finetune(config, workdir):
  """Runs (or resumes) one fine-tuning; returns the final metrics and writes result.json."""
  _, result = train.train_and_evaluate(config, workdir, bevseg_task(config, workdir))
  evals = {k[len('eval_'):]: v for k, v in result.items() if k.startswith('eval_')}
  if 'miou' in evals:
    print(format_table(evals), flush=True)
  save_result(config, workdir, result)
  return result


def main(argv):
  del argv
  config = nsflags.config_from_flags()
  data.ensure_data(config)
  finetune(config, config.train.workdir)


if __name__ == '__main__':
  nsflags.adopt_into_main()
  nsflags.run(main)
