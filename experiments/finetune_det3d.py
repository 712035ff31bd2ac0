r"""3D object detection fine-tuning (label-efficient), from a pre-trained NS-MAE backbone.

  python -m experiments.finetune_det3d --flagfile=experiments/configs/det3d_demo.flags \
      --init_workdir=runs/demo --label_fraction=0.05 --workdir=runs/det3d_demo_5pct
  (--init_workdir='' trains the same model from scratch)

The backbone (LiDAR + camera encoders, lifting, fusion) is restored from the latest checkpoint
of --init_workdir; a CenterPoint-style head predicts class heatmaps and box regressions on the
fused BEV map. --label_fraction keeps a seeded (--subset_seed) subset of the training key
frames; the number of steps does not depend on it. Each eval (use --eval_batches=0: the devkit
needs every key frame of --det_eval_set) writes the detections as a nuScenes result JSON
(<workdir>/det3d/results.json, global frame) and scores it with nuscenes-devkit's DetectionEval
(mAP, NDS, mATE, mASE, mAOE, mAVE, mAAE, per class too: eval_ keys in metrics.jsonl and
TensorBoard); BEV pictures of predicted vs true boxes go to <workdir>/images. The final metrics
go to <workdir>/result.json. All logic lives in nsmae_jax.finetune.det3d.
"""

from experiments import data
from experiments import flags as nsflags
from nsmae_jax import train
from nsmae_jax.finetune.task import save_result
from nsmae_jax.finetune.det3d import det3d_eval_batches, det3d_task, format_table


def finetune(config, workdir, **loop_kwargs):
  """Runs (or resumes) one detection fine-tuning; returns the final metrics (eval ones prefixed
  'eval_', e.g. eval_map, eval_nds) and writes <workdir>/result.json.

  loop_kwargs go to train_and_evaluate (tests: train_iterator, eval_batches_fn).
  """
  loop_kwargs.setdefault('eval_batches_fn', det3d_eval_batches(config))
  _, result = train.train_and_evaluate(config, workdir, det3d_task(config, workdir),
                                       **loop_kwargs)
  evals = {k[len('eval_'):]: v for k, v in result.items() if k.startswith('eval_')}
  if 'map' in evals:
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
