r"""Speed of the NS-MAE pre-training step, its parts, the renderer and the input pipeline.

  python -m experiments.benchmark --flagfile=experiments/configs/demo.flags --json_out=FILE \
      [--bench_parts=false] [--bench_scaling=false]

Prints tables and writes a JSON object: train_step_seconds (the training loop's step:
steps.train_step with make_optimizer's clip + AdamW, state donated, on one device),
model_gflops_per_step (XLA cost analysis of the compiled step), achieved_gflops,
matmul_peak_gflops (median GFLOP/s of an f32 2048^3 matmul run after each timed step: measured
at the same moments as the step, see peak_probe), mfu (achieved / that peak),
matmul_peak_gflops_before_step (the same matmul timed alone before the step, 5 calls),
compile_seconds (lower + XLA compile of the step, cold: the persistent compilation cache is
turned off here; compile_lower_seconds, compile_xla_seconds, compile_cache_used),
renderer_rays_per_second,
renderer_floor_ratio (renderer time / its memory-bound floor), memory_bandwidth_gbps (measured
in this run), train_samples_per_second, pipeline_examples_per_second (null when the dataset is
not converted yet), peak_rss_gb, param_counts (every named model size);
parts ({part: seconds, gflops, gflops_per_second, share of the step}: each part of PARTS jitted
alone, forward + backward on the inputs the model produces up to it) with parts_sum_seconds and
parts_remainder_seconds (step - sum: what XLA gains or loses by fusing across the seams);
scaling (seconds at three ray counts, point counts and per-device batch sizes; the rays twice:
renderer_seconds_by_rays forward only, renderer_train_seconds_by_rays forward + backward into
the field and the volume, as in training) and scaling_per_unit (the same per ray / point /
example: constant = linear);
renderer_speedup_vs_torch (PyTorch eager twin's forward + backward time / ours at this config's
renderer sizes, experiments.torch_twin; null without torch, an optional extra: see that module)
with renderer_vs_torch (both times, the sizes) and renderer_speedup_vs_torch_alone (the same
with each side timed in a process of its own, torch_twin.speedup_alone: the interleaved
rounds slow ours down, a fresh process slows torch down; in the interleaved rounds each side
runs --bench_torch_warmup untimed calls before its timed one (the slower calls after a switch, see
torch_twin); renderer_speedup_vs_torch_full,
renderer_speedup_vs_torch_full_alone and renderer_vs_torch_full (the same at
experiments/configs/full.flags' renderer sizes, 3 rounds: the issue's second size, so that both
ratios and the MFU come from one run; 5-15 min on 2 cores; --bench_torch_full=false skips
it);
full_config_device_memory_gib
(temp + argument + output - alias of the compiled full.flags step at per-device batch 2,
experiments.memory_report) with full_config_memory (its parts); hugepage_malloc (whether this
process's host allocator asks for transparent huge pages, experiments.launch: the step is 25-40%
slower without them on CPU) and host_allocator ('jemalloc' where the system has it and the entry
point preloaded it, else 'glibc': jemalloc keeps the step's buffers mapped, ~7% of the step).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

from absl import flags

from experiments import flags as nsflags
from experiments import launch
from experiments import torch_twin  # numpy only at import; torch is imported when used

_JSON_OUT = flags.DEFINE_string('json_out', '', 'Write the results as JSON to this file.')
_STEPS = flags.DEFINE_integer('bench_steps', 20, 'Timed train steps (after one warm-up step); '
                              'train_step_seconds is their median (more steps, a median '
                              'less moved by bursts of load on a shared host).')
_PIPELINE_BATCHES = flags.DEFINE_integer('bench_pipeline_batches', 20,
                                         'Batches timed from the input pipeline.')
_PARTS = flags.DEFINE_bool('bench_parts', True, 'Time the train step part by part (parts in '
                           'the JSON): each part compiled and timed on its own.')
_SCALING = flags.DEFINE_bool('bench_scaling', True, 'Time the renderer, the LiDAR encoder and '
                             'the train step at three ray counts, point counts and batch sizes.')
_FULL_MEMORY = flags.DEFINE_bool('bench_full_memory', True, 'Report the compiled step\'s '
                                 'memory per device for experiments/configs/full.flags at '
                                 'per-device batch 2 (experiments.memory_report, in a subprocess: '
                                 'a few minutes of compile on CPU).')
_TORCH = flags.DEFINE_bool('bench_torch', True, 'When torch is installed, time the PyTorch eager '
                           'twin of the renderer at this config\'s sizes '
                           '(experiments.torch_twin).')
_TORCH_FULL = flags.DEFINE_bool('bench_torch_full', True, 'With --bench_torch and torch '
                                'installed, also time the twin at experiments/configs/'
                                'full.flags\' renderer sizes (1M samples, 3 rounds; 5-15 min on '
                                '2 CPU cores).')
_TORCH_WARMUP = flags.DEFINE_integer('bench_torch_warmup', torch_twin.WARMUP, 'Untimed calls '
                                     'of each side per round of the interleaved twin timing '
                                     'before its timed call (the slower calls after a switch '
                                     'between frameworks, see experiments.torch_twin; 1 = the '
                                     'protocol before session 17).')


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


def _peak_matmul():
  """(the jitted f32 2048^3 matmul, its operand, its FLOPs)."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  return jax.jit(lambda a, b: a @ b), a, 2 * n ** 3


def matmul_peak_gflops() -> float:
  f, a, flops = _peak_matmul()
  return flops / _timed(f, a, a) / 1e9


def peak_probe():
  """() -> GFLOP/s of one f32 2048^3 matmul (compiled and warmed here): bench_train_step runs it
  after every timed step, so that the MFU's peak is measured at the same moments as the step.
  On a shared host whose speed drifts (session 16's AMD host: 71 GFLOP/s at the start of one
  run, 103-136 in earlier runs) a peak measured once, minutes away from the step, makes the MFU
  a measure of the drift."""
  import jax  # pylint: disable=import-outside-toplevel
  f, a, flops = _peak_matmul()
  jax.block_until_ready(f(a, a))

  def probe() -> float:
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    return flops / (time.perf_counter() - t) / 1e9
  return probe


def memory_bandwidth_gbps() -> float:
  """Read bandwidth: a sum over a 256 MB float32 array."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  x = jnp.ones((64 * 2 ** 20,), jnp.float32)
  return x.nbytes / _timed(jax.jit(jnp.sum), x) / 1e9


def _compile_cache_used() -> bool:
  """Whether the persistent compilation cache could serve a compile in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def _train_setup(config):
  """(task, the demo's jitted train step on one device, its TrainState, a fake batch)."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports
  from nsmae_jax import pretrain  # pylint: disable=import-outside-toplevel
  from nsmae_jax.data.fake import fake_batch  # pylint: disable=import-outside-toplevel
  from nsmae_jax.train import loop, sharding  # pylint: disable=import-outside-toplevel
  task = pretrain.pretrain_task(config)
  # The step the training loop runs (steps.train_step: per-example vmap, pmean, grad norm,
  # make_optimizer's clip + AdamW; the state donated), on a one-device mesh.
  wrapper = sharding.Jit(task.loss_fn, devices=jax.devices()[:1])
  state = loop.create_train_state(config, task, jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, fake_batch(config, config.train.per_device_batch_size))
  return task, wrapper.train, state, batch


def bench_train_step(config, steps: int, probe=None) -> dict:
  """Times the demo's train step (forward/backward + clipped AdamW update, state donated) on
  one per-device batch. compile_seconds: lower + XLA compile of the step, cold unless
  compile_cache_used (the persistent compilation cache is on in this process). With a probe
  (peak_probe()) it also runs after every timed step, and matmul_peak_gflops is its median."""
  import jax  # pylint: disable=import-outside-toplevel
  bs = config.train.per_device_batch_size
  t = time.perf_counter()
  _, train, state, batch = _train_setup(config)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  rng = jax.random.key(0)
  t = time.perf_counter()
  lowered = train.lower(state, batch, rng)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  xla_s = time.perf_counter() - t
  flops = _flops(compiled)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times, peaks = [], []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    if probe is not None:
      peaks.append(probe())
  sec = statistics.median(times)
  extra = dict(matmul_peak_gflops=statistics.median(peaks)) if peaks else {}
  return dict(**extra, train_step_seconds=sec, model_gflops_per_step=flops / 1e9,
              achieved_gflops=flops / sec / 1e9, train_samples_per_second=bs / sec,
              init_seconds=init_s, compile_seconds=lower_s + xla_s,
              compile_lower_seconds=lower_s, compile_xla_seconds=xla_s,
              compile_cache_used=_compile_cache_used(), param_count=int(count),
              loss=float(metrics['loss']))


def bench_batch_scaling(config, batch_sizes, steps: int, known: dict | None = None) -> dict:
  """{per-device batch size: train step seconds}; sizes in `known` ({size: seconds}, e.g. the
  headline step's) are not timed again."""
  known = known or {}
  return {b: known[b] if b in known else bench_train_step(
      config.replace(per_device_batch_size=b), steps)['train_step_seconds'] for b in batch_sizes}


# The parts of the train step, in order: (key, what it covers).
PARTS = (
    ('lidar', 'LiDAR: pillar scatter + PFN + BEV canvas convs'),
    ('camera', 'camera: ViT image encoder (patchify, blocks)'),
    ('lifting', 'lifting: camera->LiDAR projection + dense matmul or gathers'),
    ('fusion', 'fusion: 3D volume + BEV map convs'),
    ('rays', 'rays + targets (forward only, no params)'),
    ('renderer', 'renderer: bev decoder, sampling, field MLP, compositing'),
    ('loss', 'loss: weights of hidden targets, L2/L1 terms'),
    ('optimizer', 'optimizer: grad norm, clip, AdamW, apply'),
)


def _with(tree: dict, path: tuple, sub):
  """`tree` with the subtree at `path` replaced by `sub` (copies along the path only)."""
  if not path:
    return sub
  out = dict(tree)
  out[path[0]] = _with(tree[path[0]], path[1:], sub)
  return out


def _fwd_bwd(fn):
  """fn(diff, const) -> (out, aux) => jitted (diff, const) -> (out, aux, d out / d diff) under a
  ones cotangent: the part's forward and its backward pass, as inside the step."""
  import jax, jax.numpy as jnp  # pylint: disable=import-outside-toplevel,multiple-imports

  def run(diff, const):
    out, vjp, aux = jax.vjp(lambda d: fn(d, const), diff, has_aux=True)
    return out, aux, vjp(jax.tree.map(jnp.ones_like, out))[0]
  return jax.jit(run)


def part_programs(config) -> tuple[dict, dict]:
  """The train step cut at its module seams: ({part: jitted fn}, {part: its args}), each part
  fed realistic inputs (the outputs of running the model up to it on a fake batch, with the
  step's masking and jitter) and run forward + backward (w.r.t. its params and the activations
  the step back-propagates into), except `rays` (forward only) and `optimizer` (the update)."""
  import jax, jax.numpy as jnp, optax  # pylint: disable=import-outside-toplevel,multiple-imports
  from nsmae_jax.pretrain import losses, targets  # pylint: disable=import-outside-toplevel
  task, _, state, batch = _train_setup(config)
  model, params, f32 = task.model, state.params, jnp.float32
  k_mask, k_rays, k_render = jax.random.split(jax.random.key(1), 3)

  def app(p, *args, method, rngs=None):
    return model.apply({'params': p}, *args, method=method, rngs=rngs)

  def lidar(d, c):
    return app(_with(c['params'], ('backbone', 'lidar'), d), c['points'], c['points_mask'],
               rngs={'mask': c['key']},
               method=lambda m, x, y: m.backbone.lidar(x.astype(f32), y, True))

  def camera(d, c):
    return app(_with(c['params'], ('backbone', 'camera'), d), c['images'],
               rngs={'mask': c['key']},
               method=lambda m, x: m.backbone.camera(x.astype(f32), True))

  def lifting(d, c):
    p, feats = d
    return app(_with(c['params'], ('backbone', 'lifting'), p), feats, c['intrinsics'],
               c['cam2lidar'], method=lambda m, *a: m.backbone.lifting(*a)), None

  def fusion(d, c):
    p, lidar_bev, cam_vol = d
    return app(_with(c['params'], ('backbone', 'fusion'), p), lidar_bev, cam_vol,
               method=lambda m, *a: m.backbone.fusion(*a)), None

  def render_all(m, feats, rays, key):  # as NSMAE.__call__ after encode
    volumes = m.view_volumes(feats)
    keys = jax.random.split(key, len(rays))
    return {name: m.render(volumes[name], r['origins'], r['dirs'], r['near'], k)
            for (name, r), k in zip(sorted(rays.items()), keys)}

  def renderer(d, c):
    p, volume, bev = d
    out = app(dict(c['params'], **p), {'volume': volume, 'bev': bev}, c['rays'], c['key'],
              method=render_all)
    return {v: (o['color'], o['depth']) for v, o in out.items()}, out

  def loss(d, c):
    rendered = {v: dict(c['rendered'][v], color=d[v][0], depth=d[v][1]) for v in d}
    scored = losses._scored(config, c['rays'], c['feats'], rendered,  # pylint: disable=protected-access
                            config.loss.masked_loss)
    return losses.weighted_loss(config, scored)

  def optimizer(st, grads):
    return st.apply_gradients(grads=grads), optax.tree.norm(grads)

  fns = {name: _fwd_bwd(f) for name, f in
         (('lidar', lidar), ('camera', camera), ('lifting', lifting), ('fusion', fusion),
          ('renderer', renderer), ('loss', loss))}
  fns['rays'] = jax.jit(lambda b, k: targets.draw_rays(config, k, b))
  fns['optimizer'] = jax.jit(optimizer)

  bb = params['backbone']
  args = {'lidar': (bb['lidar'], dict(params=params, points=batch['points'],
                                      points_mask=batch['points_mask'], key=k_mask)),
          'camera': (bb['camera'], dict(params=params, images=batch['images'], key=k_mask))}
  lidar_bev, dropped, _ = fns['lidar'](*args['lidar'])
  feats, image_mask, _ = fns['camera'](*args['camera'])
  args['lifting'] = ((bb['lifting'], feats), dict(params=params, intrinsics=batch['intrinsics'],
                                                  cam2lidar=batch['cam2lidar']))
  cam_vol, _, _ = fns['lifting'](*args['lifting'])
  args['fusion'] = ((bb['fusion'], lidar_bev, cam_vol), dict(params=params))
  (volume, bev), _, _ = fns['fusion'](*args['fusion'])
  args['rays'] = (batch, k_rays)
  rays = fns['rays'](*args['rays'])
  head = {k: v for k, v in params.items() if k != 'backbone'}
  args['renderer'] = ((head, volume, bev), dict(params=params, rays=rays, key=k_render))
  colour_depth, rendered, _ = fns['renderer'](*args['renderer'])
  # The encoder's masks, as the loss sees them (drawn by the lidar and camera parts above).
  feats_masks = {'image_mask': image_mask, 'lidar_block_mask': dropped}
  args['loss'] = (colour_depth, dict(rays=rays, feats=feats_masks, rendered=rendered))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  args['optimizer'] = (state, grads)
  return fns, args


def bench_parts(config, step_seconds: float, repeats: int = 5) -> dict:
  """{part: dict(seconds, gflops, gflops_per_second, share)} over PARTS (see part_programs);
  share = seconds / step_seconds. FLOPs from XLA's cost analysis of each part's program."""
  fns, args = part_programs(config)
  out = {}
  for name, _ in PARTS:
    flops = _flops(fns[name].lower(*args[name]).compile())
    sec = _timed(fns[name], *args[name], repeats=repeats)
    out[name] = dict(seconds=sec, gflops=flops / 1e9, gflops_per_second=flops / sec / 1e9,
                     share=sec / step_seconds)
  return out


def bench_renderer(config, ray_counts, backward: bool = False) -> dict:
  """Rendering of R perspective-like rays through a fixed fused volume: forward only (the
  colour), or with backward the gradient of a colour + depth loss with respect to the field's
  parameters and the volume (the renderer as the train step runs it)."""
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

    def render(p, v, o, d, k, n=near):
      return model.apply({'params': p}, v, o, d, n, k, method=model.render)

    def loss(p, v, o, d, k):  # colour and depth, as the pre-training loss uses both
      x = render(p, v, o, d, k)
      return jnp.sum(x['color'] ** 2) + jnp.sum(x['depth'])

    if backward:
      fn = jax.jit(jax.grad(loss, argnums=(0, 1)))  # the field's params and the volume
    else:
      fn = jax.jit(lambda p, v, o, d, k: render(p, v, o, d, k)['color'])
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


def _scaling(config, steps: int, with_sizes: bool, step_seconds: float | None = None
             ) -> tuple[dict, dict, dict]:
  """(headline renderer figures, scaling {series: {size: seconds}}, per-unit {series: {size:
  seconds per ray / point / example}}); without with_sizes only the renderer's largest size.
  step_seconds: the train step's time at the config's batch size, if already measured."""
  r0 = config.render.perspective_rays + config.render.bev_rays
  ray_counts = [r0, 2 * r0, 4 * r0] if with_sizes else [4 * r0]
  rtimes = bench_renderer(config, ray_counts)
  head = {'renderer_rays_per_second': ray_counts[-1] / rtimes[ray_counts[-1]],
          '_renderer_seconds': rtimes[ray_counts[-1]], '_renderer_rays': ray_counts[-1]}
  if not with_sizes:
    return head, {}, {}
  p0, b0 = config.data.max_points, config.train.per_device_batch_size
  scaling = {'renderer_seconds_by_rays': rtimes,
             'renderer_train_seconds_by_rays': bench_renderer(config, ray_counts,
                                                              backward=True),
             'lidar_seconds_by_points': bench_lidar(config, [p0 // 4, p0 // 2, p0]),
             'train_step_seconds_by_batch': bench_batch_scaling(
                 config, [b0, 2 * b0, 4 * b0], steps,
                 known={b0: step_seconds} if step_seconds else None)}
  units = {'renderer_seconds_by_rays': 'renderer_seconds_per_ray',
           'renderer_train_seconds_by_rays': 'renderer_train_seconds_per_ray',
           'lidar_seconds_by_points': 'lidar_seconds_per_point',
           'train_step_seconds_by_batch': 'train_step_seconds_per_example'}
  per_unit = {units[k]: {n: s / n for n, s in v.items()} for k, v in scaling.items()}
  return head, scaling, per_unit


def print_report(results: dict) -> None:
  """The results as tables on stdout."""
  rows = [(k, v) for k, v in results.items() if not isinstance(v, dict)]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v:.4g}' if isinstance(v, float) else f'{k:<{width}}  {v}')
  parts = results.get('parts') or {}
  if parts:
    what = dict(PARTS)
    step = results['train_step_seconds']
    print(f'\ntrain step by part (forward + backward; {step * 1e3:.1f} ms, '
          f'{results["model_gflops_per_step"]:.3g} GFLOP per step)')
    print(f'{"part":<58} {"ms":>8} {"GFLOP":>8} {"GFLOP/s":>8} {"share":>6}')
    for name, r in parts.items():
      print(f'{what.get(name, name):<58} {r["seconds"] * 1e3:8.2f} {r["gflops"]:8.3f} '
            f'{r["gflops_per_second"]:8.2f} {r["share"]:6.1%}')
    rest = results['parts_remainder_seconds']
    print(f'{"other (fusion by XLA across parts, etc.; < 0: parts cost more alone)":<58} '
          f'{rest * 1e3:8.2f} {"":>8} {"":>8} {rest / step:6.1%}')
  if results.get('scaling'):
    print('\nscaling (seconds per unit relative to the smallest size: 1.0 = linear)')
    for (name, series), per in zip(results['scaling'].items(),
                                   results['scaling_per_unit'].items()):
      base = next(iter(per[1].values()))
      print(f'{name:<30} ' + ', '.join(
          f'{n}: {s * 1e3:.1f} ms ({per[1][n] * 1e6:.3g} us/unit, x{per[1][n] / base:.2f})'
          for n, s in series.items()))
  for name, counts in results['param_counts'].items():
    print(f'params[{name}]'.ljust(width) + '  ' + ', '.join(f'{g}={n:,}' for g, n in
                                                            counts.items()))


def full_config_memory(per_device_batch_size: int = 2) -> dict:
  """experiments.memory_report's figures for full.flags, run in a fresh process: the
  memory-minimising CPU scheduler it needs is an XLA flag read when jax starts."""
  import os  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'memory.json')
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    launch.run_entry_point('experiments.memory_report',
                           [f'--flagfile={root}/experiments/configs/full.flags',
                            f'--per_device_batch_size={per_device_batch_size}',
                            f'--memory_json_out={out}'], cwd=root, env=env, check=True)
    with open(out) as f:
      return json.load(f)


def torch_speedup(config_or_sizes, repeats: int = 5, warmup: int = torch_twin.WARMUP
                  ) -> dict | None:
  """experiments.torch_twin.speedup (interleaved rounds, `warmup` untimed calls of each side
  per round before its timed one) and speedup_alone (each side in a process of its own) at a
  config's renderer sizes or at torch_twin.Sizes; None without torch."""
  if not torch_twin.torch_available():
    return None
  sizes = (config_or_sizes if isinstance(config_or_sizes, torch_twin.Sizes)
           else torch_twin.sizes_from_config(config_or_sizes))
  twin = torch_twin.speedup(sizes, repeats=repeats, warmup=warmup)
  twin.update(torch_twin.speedup_alone(sizes, repeats=repeats, lookup=twin['torch_lookup']))
  return twin


def _twin_keys(twin: dict | None, suffix: str = '') -> dict:
  """The JSON keys of one torch_speedup result (None: not timed), e.g. suffix '_full'."""
  return {f'renderer_speedup_vs_torch{suffix}': twin and twin['renderer_speedup_vs_torch'],
          f'renderer_speedup_vs_torch{suffix}_alone': (
              twin and twin['renderer_speedup_vs_torch_alone']),
          f'renderer_vs_torch{suffix}': twin}


def full_sizes():
  """torch_twin.Sizes of experiments/configs/full.flags' renderer (one device's step)."""
  return torch_twin.sizes_from_config(nsflags.config_from_flagfile(torch_twin.FULL_FLAGS),
                                      'full')


def run_benchmarks(config, steps: int = 5, parts: bool = True, scaling: bool = True,
                   pipeline_batches: int = 20, full_memory: bool = False,
                   torch: bool = False, torch_full: bool = False,
                   torch_warmup: int = torch_twin.WARMUP) -> dict:
  """Every figure of the module docstring for `config`, as the JSON holds them."""
  import jax  # pylint: disable=import-outside-toplevel
  results = {}
  bandwidth = memory_bandwidth_gbps()
  results.update(matmul_peak_gflops_before_step=matmul_peak_gflops(),
                 memory_bandwidth_gbps=bandwidth)
  results.update(bench_train_step(config, steps, probe=peak_probe()))
  results['mfu'] = results['achieved_gflops'] / results['matmul_peak_gflops']
  if parts:
    results['parts'] = bench_parts(config, results['train_step_seconds'])
    results['parts_sum_seconds'] = sum(r['seconds'] for r in results['parts'].values())
    results['parts_remainder_seconds'] = (results['train_step_seconds']
                                          - results['parts_sum_seconds'])
  head, series, per_unit = _scaling(config, steps, scaling, results['train_step_seconds'])
  results['renderer_rays_per_second'] = head['renderer_rays_per_second']
  floor_s = renderer_floor_bytes(config, head['_renderer_rays']) / (bandwidth * 1e9)
  results['renderer_floor_seconds'] = floor_s
  results['renderer_floor_ratio'] = head['_renderer_seconds'] / floor_s
  results['scaling'] = series
  results['scaling_per_unit'] = per_unit
  results['pipeline_examples_per_second'] = bench_pipeline(config, pipeline_batches)
  results['param_counts'] = param_counts(config)
  results['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  results['device'] = f'{jax.devices()[0].platform} x{jax.device_count()}'
  results['hugepage_malloc'] = launch.hugepage_malloc_active()
  results['host_allocator'] = launch.host_allocator()
  results.update(_twin_keys(torch_speedup(config, warmup=torch_warmup) if torch else None))
  results.update(_twin_keys(torch_speedup(full_sizes(), repeats=3, warmup=torch_warmup)
                            if torch and torch_full else None, '_full'))
  memory = full_config_memory() if full_memory else None
  results['full_config_device_memory_gib'] = memory and memory['device_memory_gib']
  results['full_config_memory'] = memory
  return results


def main(argv):
  del argv
  config = nsflags.config_from_flags()
  import jax  # pylint: disable=import-outside-toplevel
  # compile_seconds is a cold compile: nothing may load the step from a persistent cache
  # (JAX_COMPILATION_CACHE_DIR, or --compilation_cache_dir which only ensure_data turns on).
  jax.config.update('jax_enable_compilation_cache', False)
  results = run_benchmarks(config, _STEPS.value, _PARTS.value, _SCALING.value,
                           _PIPELINE_BATCHES.value, _FULL_MEMORY.value, _TORCH.value,
                           _TORCH_FULL.value, _TORCH_WARMUP.value)
  print_report(results)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(results, f, indent=2, default=str)
  sys.stdout.flush()


if __name__ == '__main__':
  nsflags.run(main)
