r"""Speed of the NS-MAE pre-training step, the renderer and the input pipeline.

  python -m experiments.benchmark --flagfile=experiments/configs/demo.flags --json_out=FILE

Prints a table and writes a JSON object: train_step_seconds, model_gflops_per_step (XLA cost
analysis of the compiled step), achieved_gflops, matmul_peak_gflops (f32 2048^3 matmul measured
in this run), mfu, renderer_rays_per_second, renderer_floor_ratio (renderer time / its
memory-bound floor), memory_bandwidth_gbps (measured in this run), train_samples_per_second,
pipeline_examples_per_second (null when the dataset is not converted yet), peak_rss_gb,
scaling (times at three ray and point counts), param_counts (every named model size).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

from absl import flags

from experiments import flags as nsflags

_JSON_OUT = flags.DEFINE_string('json_out', '', 'Write the results as JSON to this file.')
_STEPS = flags.DEFINE_integer('bench_steps', 5, 'Timed train steps (after one warm-up step).')
_PIPELINE_BATCHES = flags.DEFINE_integer('bench_pipeline_batches', 20,
                                         'Batches timed from the input pipeline.')


def _timed(fn, *args, repeats: int = 5) -> float:
  """Median seconds of fn(*args) (blocked), after one warm-up call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0))


def matmul_peak_gflops() -> float:
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / _timed(f, a, a) / 1e9


def memory_bandwidth_gbps() -> float:
  """Read bandwidth: a sum over a 256 MB float32 array."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  x = jnp.ones((64 * 2 ** 20,), jnp.float32)
  return x.nbytes / _timed(jax.jit(jnp.sum), x) / 1e9


def bench_train_step(config, steps: int) -> dict:
  """Times a jitted forward/backward + AdamW update of one per-device batch."""
  import jax, jax.numpy as jnp, optax  # pylint: disable=import-outside-toplevel,multiple-imports
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  task = pretrain.pretrain_task(config)
  model = task.model
  bs = config.train.per_device_batch_size
  batch = jax.tree.map(jnp.asarray, fake_batch(config, bs))
  t = time.perf_counter()
  params = jax.jit(task.init_params)(jax.random.key(0), batch)
  init_s = time.perf_counter() - t
  tx = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)
  opt_state = tx.init(params)

  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(
        lambda p: pretrain.pretrain_loss(model, p, batch, rng), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch,
                                                         jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  flops = _flops(compiled)
  params, opt_state, loss = compiled(params, opt_state, batch, jax.random.key(0))
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch, jax.random.key(i + 1))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  count = sum(x.size for x in jax.tree.leaves(params))
  return dict(train_step_seconds=sec, model_gflops_per_step=flops / 1e9,
              achieved_gflops=flops / sec / 1e9, train_samples_per_second=bs / sec,
              init_seconds=init_s, compile_seconds=compile_s, param_count=int(count),
              loss=float(loss))


def bench_renderer(config, ray_counts) -> dict:
  """Forward rendering of R perspective-like rays through a fixed fused volume."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nsmae_jax import models, pretrain  # pylint: disable=import-outside-toplevel
  model = pretrain.build_pretrain_model(config)
  size = models.resolve_size(config)
  shape = config.volume_shape + (size.volume_channels,)
  volume = jax.random.normal(jax.random.key(0), (1,) + shape)
  field_params = None
  out = {}
  for r in ray_counts:
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(1, r, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origins = jnp.zeros((1, r, 3))
    dirs = jnp.asarray(dirs, jnp.float32)
    near = jnp.full((1, r), 0.5)
    if field_params is None:
      field_params = jax.jit(lambda: model.init(
          jax.random.key(0), volume, origins, dirs, near, jax.random.key(1),
          method=model.render))()['params']
    fn = jax.jit(lambda p, v, o, d, k, n=near: model.apply({'params': p}, v, o, d, n, k,
                                                           method=model.render)['color'])
    out[r] = _timed(fn, field_params, volume, origins, dirs, jax.random.key(1))
  return out


def renderer_floor_bytes(config, rays: int) -> float:
  """Bytes the renderer must move per call: for every sample, the 8 gathered corner features,
  the interpolated feature written once and read once by the field MLP (float32)."""
  from nsmae_jax import models  # pylint: disable=import-outside-toplevel
  c = models.resolve_size(config).volume_channels
  return rays * config.render.num_samples * (8 * c + 2 * c) * 4


def bench_lidar(config, point_counts) -> dict:
  """Forward LiDAR encoder (pillars, PFN, BEV backbone) at several point counts."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  from nsmae_jax import models  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  from nsmae_jax.models.pillars import LiDAREncoder  # pylint: disable=import-outside-toplevel
  out = {}
  for p in point_counts:
    cfg = config.replace(max_points=p)
    batch = jax.tree.map(jnp.asarray, fake_batch(cfg, 1))
    size = models.resolve_size(cfg)
    enc = LiDAREncoder(cells=cfg.pillar_cells, half_extent=cfg.data.bev_half_extent,
                       z_min=cfg.model.z_min, z_max=cfg.model.z_max,
                       pillar_features=size.pillar_features, bev_channels=size.bev_channels,
                       bev_blocks=size.bev_blocks, out_stride=cfg.model.volume_stride,
                       mask_ratio=cfg.model.lidar_mask_ratio)
    params = jax.jit(lambda b: enc.init({'params': jax.random.key(0), 'mask': jax.random.key(1)},
                                        b['points'], b['points_mask'], True))(batch)
    fn = jax.jit(lambda prm, b: enc.apply(prm, b['points'], b['points_mask'], True,
                                          rngs={'mask': jax.random.key(0)})[0])
    out[p] = _timed(fn, params, batch)
  return out


def bench_pipeline(config, batches: int) -> float | None:
  """Examples/s from the grain input pipeline (after its first batch), or None when the dataset
  is not converted."""
  from data_prep import prepare  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if not prepare.dataset_exists(config):
    return None
  it = pipeline.make_train_iterator(config)
  try:
    first = next(it)
    n_per = int(first['images'].shape[0] * first['images'].shape[1])
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * n_per / (time.perf_counter() - t)
  finally:
    it.close()


def param_counts(config) -> dict:
  """Parameters of every named size at this config's geometry (abstract init, no compute)."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nsmae_jax import models, pretrain  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  out = {}
  for name in models.MODEL_SIZES:
    cfg = config.replace(model_size=name, vit_width=0, vit_depth=0, vit_heads=0,
                         pillar_features=0, bev_channels=0, volume_channels=0)
    init = pretrain.pretrain_task(cfg).init_params
    batch = jax.tree.map(jnp.asarray, fake_batch(cfg, 1))
    shapes = jax.eval_shape(init, jax.random.key(0), batch)
    groups = pretrain.param_groups(shapes)
    out[name] = {g: int(sum(np.prod(s.shape) for s in jax.tree.leaves(t)))
                 for g, t in groups.items()}
    out[name]['total'] = sum(out[name].values())
  return out


def main(argv):
  del argv
  config = nsflags.config_from_flags()
  results = {}
  peak = matmul_peak_gflops()
  bandwidth = memory_bandwidth_gbps()
  results.update(matmul_peak_gflops=peak, memory_bandwidth_gbps=bandwidth)
  results.update(bench_train_step(config, _STEPS.value))
  results['mfu'] = results['achieved_gflops'] / peak
  r0 = config.render.perspective_rays + config.render.bev_rays
  ray_counts = [r0, 2 * r0, 4 * r0]
  rtimes = bench_renderer(config, ray_counts)
  results['renderer_rays_per_second'] = ray_counts[-1] / rtimes[ray_counts[-1]]
  floor_s = renderer_floor_bytes(config, ray_counts[-1]) / (bandwidth * 1e9)
  results['renderer_floor_seconds'] = floor_s
  results['renderer_floor_ratio'] = rtimes[ray_counts[-1]] / floor_s
  p0 = config.data.max_points
  ptimes = bench_lidar(config, [p0 // 4, p0 // 2, p0])
  results['scaling'] = {'renderer_seconds_by_rays': rtimes, 'lidar_seconds_by_points': ptimes}
  results['pipeline_examples_per_second'] = bench_pipeline(config, _PIPELINE_BATCHES.value)
  results['param_counts'] = param_counts(config)
  results['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  import jax  # pylint: disable=import-outside-toplevel
  results['device'] = f'{jax.devices()[0].platform} x{jax.device_count()}'

  rows = [(k, v) for k, v in results.items() if not isinstance(v, dict)]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v:.4g}' if isinstance(v, float) else f'{k:<{width}}  {v}')
  for name, series in results['scaling'].items():
    print(f'{name:<{width}}  ' + ', '.join(f'{n}: {s * 1e3:.1f} ms' for n, s in series.items()))
  for name, counts in results['param_counts'].items():
    print(f'params[{name}]'.ljust(width) + '  ' + ', '.join(f'{g}={n:,}' for g, n in
                                                            counts.items()))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump({k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v)
                 for k, v in results.items()}, f, indent=2, default=str)
  sys.stdout.flush()


if __name__ == '__main__':
  nsflags.run(main)
