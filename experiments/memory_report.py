r"""Device memory of the compiled pre-training step, without running it (works on CPU).

  python -m experiments.memory_report --flagfile=experiments/configs/full.flags \
      --per_device_batch_size=2

The step is the training loop's own: `create_train_state`'s state (params from the task's
`init_params`, the loop's optimiser) and `sharding.Jit`'s data-parallel `train_step` (jit of
shard_map, state donated), lowered on one device with abstract shapes (jax.eval_shape and
jax.ShapeDtypeStruct: nothing of the model's size is allocated) and compiled; XLA's
memory_analysis() of that executable is the per-device footprint (the per-device program is the
same on N devices: the batch is sharded, the state replicated).

device_memory_gib = temp + argument + output - alias: scratch (activations kept for the backward
pass, workspaces) plus the live inputs (state, batch, rng) plus the outputs (new state,
metrics), less the outputs that reuse a donated input's buffer (the state). It is XLA's static
estimate of the program's peak, not a measured high-water mark; generated code and the runtime
are not counted. On CPU the command line compiles with XLA's memory-minimising scheduler
(CPU_SCHEDULER_FLAG in XLA_FLAGS), as an accelerator's compiler schedules for memory; the default
CPU scheduler trades memory for parallelism and undoes rematerialisation (a caller in a process
started without the flag gets that default's figure; the result says which).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from experiments import flags as nsflags

_JSON_OUT = flags.DEFINE_string('memory_json_out', '', 'Also write the figures as JSON here.')

_GIB = 2.0 ** 30
# XLA:CPU's default concurrency-optimised scheduler runs independent work early for parallelism;
# a rematerialised region depends only on its saved inputs, so it hoists every recomputation to
# the forward pass and remat saves nothing (full.flags, --remat: 18.9 GiB vs 14.7 GiB with the
# memory-minimising scheduler, measured when the fusion still used a full im2col). GPU/TPU
# schedule for memory; so does this CPU estimate when the process starts with this flag in
# XLA_FLAGS (the CLI sets it; compile()'s compiler_options did not change the schedule).
CPU_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def abstract_step(config, per_device_batch_size: int):
  """(jitted train step, abstract state, abstract batch, abstract rng) of the training loop's
  step for `config` at `per_device_batch_size`, on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  from nsmae_jax.pretrain import pretrain_task  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train import sharding  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train.steps import TrainState  # pylint: disable=import-outside-toplevel

  config = config.replace(per_device_batch_size=per_device_batch_size)
  task = pretrain_task(config)
  # fake_batch at batch 1 only for its shapes and dtypes (a few MB), then the real batch size.
  batch = {k: jax.ShapeDtypeStruct((per_device_batch_size,) + np.shape(v)[1:], np.asarray(v).dtype)
           for k, v in fake_batch(config, 1).items()}
  rng = jax.ShapeDtypeStruct((2,), np.uint32)  # jax.random.PRNGKey's raw key

  def create(key, example):  # as loop.create_train_state
    params = task.init_params(key, example)
    return TrainState.create(apply_fn=None, params=params,
                             tx=make_optimizer(config.train, task.lr_scales))

  state = jax.eval_shape(create, rng, batch)
  step = sharding.Jit(task.loss_fn, devices=jax.devices()[:1]).train
  return step, state, batch, rng


def device_memory(config, per_device_batch_size: int) -> dict:
  """XLA's memory analysis of the compiled pre-training step at `per_device_batch_size`.

  Returns {'device_memory_gib': temp + argument + output - alias, 'temp_gib', 'argument_gib',
  'output_gib', 'alias_gib', 'generated_code_gib', 'per_device_batch_size', 'lower_seconds',
  'compile_seconds', 'remat', 'half_precision', 'backend', 'cpu_memory_scheduler' (whether
  XLA_FLAGS holds CPU_SCHEDULER_FLAG)}; sizes in GiB (2**30 bytes).
  """
  import jax  # pylint: disable=import-outside-toplevel
  step, state, batch, rng = abstract_step(config, per_device_batch_size)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  temp, arg = m.temp_size_in_bytes, m.argument_size_in_bytes
  out, alias = m.output_size_in_bytes, m.alias_size_in_bytes
  return {
      'device_memory_gib': (temp + arg + out - alias) / _GIB,
      'temp_gib': temp / _GIB, 'argument_gib': arg / _GIB, 'output_gib': out / _GIB,
      'alias_gib': alias / _GIB,
      'generated_code_gib': m.generated_code_size_in_bytes / _GIB,
      'per_device_batch_size': per_device_batch_size,
      'lower_seconds': t1 - t0, 'compile_seconds': t2 - t1,
      'remat': config.train.remat,
      'half_precision': bool(config.train.half_precision),
      'backend': jax.default_backend(),
      'cpu_memory_scheduler': CPU_SCHEDULER_FLAG in os.environ.get('XLA_FLAGS', ''),
  }


def main(argv) -> None:
  del argv
  config = nsflags.config_from_flags(check_files=False)  # reads no data
  r = device_memory(config, config.train.per_device_batch_size)
  print(f'per-device batch {r["per_device_batch_size"]}, remat={r["remat"]}, '
        f'half_precision={r["half_precision"]}: lowered in {r["lower_seconds"]:.1f} s, '
        f'compiled in {r["compile_seconds"]:.1f} s ({r["backend"]}, memory-minimising CPU '
        f'scheduler: {r["cpu_memory_scheduler"]})')
  for key in ('temp_gib', 'argument_gib', 'output_gib', 'alias_gib', 'generated_code_gib'):
    print(f'  {key:<20} {r[key]:8.3f}')
  print(f'device_memory_gib (temp + argument + output - alias): {r["device_memory_gib"]:.3f}')
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(r, f, indent=1)
  sys.stdout.flush()


if __name__ == '__main__':
  if 'jax' not in sys.modules:  # read once, when jax's backend starts
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {CPU_SCHEDULER_FLAG}'.strip()
  nsflags.adopt_into_main()
  nsflags.run(main)
