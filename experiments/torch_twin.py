r"""A PyTorch (eager) twin of the nsmae_jax renderer, and our renderer's speed against it.

  python -m experiments.torch_twin --flagfile=experiments/configs/demo.flags

Prints, for the flagfile's own sizes, full.flags' sizes and a fixed 4096 rays x 64 samples /
128x128x8x32 case, the seconds of one forward + backward (w.r.t. the fused volume, the field
MLP's parameters and the learned background) of our jitted renderer and of the torch twin, and
their ratio `renderer_speedup_vs_torch` = torch seconds / our seconds (> 1: ours is faster).
With --twin_field_split, also the field MLP alone on both sides (field_speedup), which shows
how much of the ratio the field's matmuls leave to the rest of the renderer.

The twin is the same math, written the way torch code is, op for op what NSMAE.render does:
box_near_far (slab test, near clamp), stratified samples (bin jitter, or bin centres), points,
trilinear lookup of the cell-centred [X, Y, Z, C] volume with the border clamp, the NeRF
positional encodings [x, sin(2^k pi x), cos(2^k pi x)] of the normalised point and of the view
direction, the field MLP (trunk of field_depth ReLU layers of field_width, shifted-softplus
density, colour branch on [trunk, PE(dir)] of width // 2 and a sigmoid), exclusive-cumsum
compositing with the remaining transmittance on far (depth) and on sigmoid(background logit)
(colour). The trilinear lookup comes in two forms, both timed: `grid_sample` (torch's fused
kernel; align_corners=False with padding_mode='border' is exactly our cell-centred clamp) and
`gather` (8 corner gathers of the flattened volume, as our lookup was written until it became
one gather of each point's 2 x 2 x 2 block). torch_seconds is the
faster of the two (the best torch eager does on this math). tests/test_torch_twin.py checks
that both forms agree with ours (outputs and gradients, same inputs and weights).

Timings are medians over rounds (ours, torch grid_sample, torch gather, ours, ...) after our
compile call. In each round each implementation runs 1 + `warmup` times in a row and only the
last call counts: the calls right after the other framework ran are up to 2x slower (session
17 blamed the process's malloc state, torch's frees trimming glibc's heap; session 18 counted
the same ~500 page faults a call in steady state and ~700-900 in the first calls, too few to
explain it, and found the first calls after the process sat idle slow too: the cause is not
established), which a training loop of one framework never sees. Those first calls are
reported too (`*_after_switch_seconds`). Session 17 (2 cores with AVX-512) measured how long
that lasts, medians by position in a block of 8 calls over 7 rounds at the demo config's sizes:
ours 139, 75, 74, 70, 67, 56, 58, 60 ms, torch 129, 132, 127, 136, 136, 125, 123, 129 ms (with
glibc's trim and mmap thresholds pinned, our first call took 72 ms); at full.flags' sizes, 2
rounds of 4: ours 5.3 / 7.5, 3.8 / 4.1, 4.8 / 3.9, 4.0 / 3.8 s, torch grid_sample 7.9 / 8.1,
11.5 / 9.0, 11.2 / 9.0, 10.1 / 8.5 s. Hence WARMUP = 4 (--twin_warmup here);
warmup=1, one untimed call, was the protocol until then. Session 18 (same kind of host) saw the
decay last longer, ~20 calls after 12 of torch's (ours 77, 74, 66, 61, ... 53 ms), and the host
move whole processes by up to 30%; a time-based warm-up and separate processes did not steady
the ratio (docs/cpu_performance.md, session 18), so WARMUP stayed. Both run in float32 on the
same threads (half_precision in a flagfile is ignored here), under the process's host allocator
(experiments.launch: jemalloc where the system has it): at full.flags' sizes torch's step took
6.4 s under jemalloc against 11.1 s under glibc, ours 3.4 vs 3.5 s (session 19), so ratios are
comparable only under the same allocator. torch is an optional extra, never a
dependency of nsmae_jax: without it this prints a message and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from experiments import launch

# Untimed calls of each side per interleaved round before its timed call (module docstring).
WARMUP = 4
FULL_FLAGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'full.flags')


def torch_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


# ---------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the renderer's cost depends on (one renderer call: batch x (perspective + BEV) rays)."""
  name: str
  batch: int = 1
  perspective_rays: int = 1024
  bev_rays: int = 512
  num_samples: int = 32
  volume_shape: tuple[int, int, int] = (32, 32, 6)
  channels: int = 32
  field_width: int = 64
  field_depth: int = 2
  pos_freqs: int = 6
  dir_freqs: int = 4
  box_min: tuple[float, float, float] = (-32.0, -32.0, -3.0)
  box_max: tuple[float, float, float] = (32.0, 32.0, 3.0)
  near: float = 0.5

  @property
  def rays(self) -> int:
    """Rays per example."""
    return self.perspective_rays + self.bev_rays

  def describe(self) -> dict[str, Any]:
    return dict(size=self.name, batch=self.batch, rays=self.batch * self.rays,
                num_samples=self.num_samples, volume_shape=list(self.volume_shape),
                channels=self.channels, field_width=self.field_width,
                field_depth=self.field_depth)


def sizes_from_config(config, name: str = 'config') -> Sizes:
  """The renderer's sizes in one pre-training step of `config` on one device (both views)."""
  from nsmae_jax.models import resolve_size  # pylint: disable=import-outside-toplevel
  r = config.render
  lo, hi = config.volume_bounds
  return Sizes(name=name, batch=config.train.per_device_batch_size,
               perspective_rays=r.perspective_rays, bev_rays=r.bev_rays,
               num_samples=r.num_samples, volume_shape=tuple(config.volume_shape),
               channels=resolve_size(config).volume_channels, field_width=r.field_width,
               field_depth=r.field_depth, pos_freqs=r.pos_freqs, dir_freqs=r.dir_freqs,
               box_min=tuple(lo), box_max=tuple(hi), near=r.near)


# 4096 rays x 64 samples through a 128 x 128 x 8 volume of 32 channels (a 64 m x 64 m x 6 m box).
LARGE = Sizes(name='4096x64', batch=1, perspective_rays=2048, bev_rays=2048, num_samples=64,
              volume_shape=(128, 128, 8), channels=32, field_width=64, field_depth=2)


# ---------------------------------------------------------------------------------------------
# Inputs and our renderer


def make_inputs(sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 inputs of one renderer call: volume [B, X, Y, Z, C], background logit [3], and per
  example perspective rays (from around the ego car, near = sizes.near) then top-down BEV rays
  (from the volume's top, near = 0): origins, dirs [B, R, 3], near [B, R]; colour and depth
  targets [B, R, 3], [B, R] for the loss."""
  rng = np.random.default_rng(seed)
  b, p, q = sizes.batch, sizes.perspective_rays, sizes.bev_rays
  lo, hi = np.asarray(sizes.box_min), np.asarray(sizes.box_max)
  volume = rng.normal(size=(b, *sizes.volume_shape, sizes.channels))
  po = np.stack([rng.uniform(-1, 1, (b, p)), rng.uniform(-1, 1, (b, p)),
                 np.full((b, p), lo[2] + 0.6 * (hi[2] - lo[2]))], -1)
  az, el = rng.uniform(-np.pi, np.pi, (b, p)), rng.uniform(-0.35, 0.15, (b, p))
  pd = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
  bo = np.concatenate([rng.uniform(lo[:2], hi[:2], (b, q, 2)), np.full((b, q, 1), hi[2])], -1)
  bd = np.broadcast_to(np.array([0.0, 0.0, -1.0]), (b, q, 3))
  near = np.concatenate([np.full((b, p), sizes.near), np.zeros((b, q))], -1)
  out = dict(volume=volume, background=rng.normal(size=(3,)),
             origins=np.concatenate([po, bo], 1), dirs=np.concatenate([pd, bd], 1), near=near,
             target_color=rng.uniform(size=(b, sizes.rays, 3)),
             target_depth=rng.uniform(0, 40, (b, sizes.rays)))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def jax_field(sizes: Sizes):
  from nsmae_jax.render import RadianceField  # pylint: disable=import-outside-toplevel
  return RadianceField(width=sizes.field_width, depth=sizes.field_depth,
                       pos_freqs=sizes.pos_freqs, dir_freqs=sizes.dir_freqs,
                       box_min=sizes.box_min, box_max=sizes.box_max)


def init_params(sizes: Sizes, seed: int = 0) -> dict:
  """The field's flax params (float32), biases drawn too so that every weight matters."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  c = sizes.channels
  params = jax_field(sizes).init(jax.random.key(seed), jnp.zeros((1, c)), jnp.zeros((1, 3)),
                                 jnp.ones((1, 3)) / math.sqrt(3.0))['params']
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
                       if path[-1].key == 'bias' else x), params)


def jax_render_fn(sizes: Sizes):
  """(params, volume, background logit, origins, dirs, near, key or None) -> composite()
  outputs: NSMAE.render's renderer (box_near_far, render_rays over sigmoid(background))."""
  import jax  # pylint: disable=import-outside-toplevel
  from nsmae_jax.render import box_near_far, render_rays  # pylint: disable=import-outside-toplevel
  field = jax_field(sizes)

  def render(params, volume, background, origins, dirs, near, key):
    n, f, _ = box_near_far(origins, dirs, sizes.box_min, sizes.box_max, near)
    field_fn = lambda *a: field.apply({'params': params}, *a)
    return render_rays(field_fn, volume, origins, dirs, n, f, sizes.num_samples, sizes.box_min,
                       sizes.box_max, key, jax.nn.sigmoid(background))
  return render


def _loss(color, depth, target_color, target_depth, mean, abs_):
  """The pre-training losses' form: L2 colour + 0.1 L1 depth."""
  return mean((color - target_color) ** 2) + 0.1 * mean(abs_(depth - target_depth))


def jax_grad_fn(sizes: Sizes):
  """jitted (params, volume, background, origins, dirs, near, key, targets...) ->
  (loss, (d params, d volume, d background))."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  render = jax_render_fn(sizes)

  def loss(params, volume, background, origins, dirs, near, key, target_color, target_depth):
    out = render(params, volume, background, origins, dirs, near, key)
    return _loss(out['color'], out['depth'], target_color, target_depth, jnp.mean, jnp.abs)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


# ---------------------------------------------------------------------------------------------
# The torch twin


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  return torch


def torch_positional_encoding(x, num_freqs: int):
  """[x, sin(2^k pi x), cos(2^k pi x)] in our order (frequency-major, then coordinate)."""
  torch = _torch()
  scales = (2.0 ** torch.arange(num_freqs, dtype=x.dtype)) * math.pi
  xb = (x[..., None, :] * scales[:, None]).reshape(*x.shape[:-1], -1)
  return torch.cat([x, torch.sin(xb), torch.cos(xb)], dim=-1)


def make_torch_field(sizes: Sizes):
  """The field MLP as a torch.nn.Module (nn.Linear layers named as our flax Dense layers)."""
  torch = _torch()
  nn, fn = torch.nn, torch.nn.functional
  pos_dim, dir_dim = 3 * (1 + 2 * sizes.pos_freqs), 3 * (1 + 2 * sizes.dir_freqs)
  w = sizes.field_width

  class TorchField(nn.Module):
    """density, colour = F(volume feature, PE(point), PE(direction))."""

    def __init__(self):
      super().__init__()
      self.trunk = nn.ModuleList(
          [nn.Linear(sizes.channels + pos_dim if i == 0 else w, w)
           for i in range(sizes.field_depth)])
      self.density = nn.Linear(w, 1)
      self.color_hidden = nn.Linear(w + dir_dim, w // 2)
      self.color = nn.Linear(w // 2, 3)
      self.register_buffer('lo', torch.tensor(sizes.box_min, dtype=torch.float32))
      self.register_buffer('hi', torch.tensor(sizes.box_max, dtype=torch.float32))

    def forward(self, features, points, dirs):
      p = 2.0 * (points - self.lo) / (self.hi - self.lo) - 1.0
      x = torch.cat([features, torch_positional_encoding(p, sizes.pos_freqs)], dim=-1)
      for layer in self.trunk:
        x = fn.relu(layer(x))
      density = fn.softplus(self.density(x)[..., 0] - 1.0)
      d = torch_positional_encoding(dirs, sizes.dir_freqs)
      h = fn.relu(self.color_hidden(torch.cat([x, d], dim=-1)))
      return density, torch.sigmoid(self.color(h))

  return TorchField()


def load_flax_params(field, params: dict) -> None:
  """Copies our flax field params into the torch field (kernel [in, out] -> weight [out, in])."""
  torch = _torch()
  layers = {f'trunk_{i}': m for i, m in enumerate(field.trunk)}
  layers.update(density=field.density, color_hidden=field.color_hidden, color=field.color)
  with torch.no_grad():
    for name, layer in layers.items():
      layer.weight.copy_(torch.from_numpy(np.asarray(params[name]['kernel']).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.asarray(params[name]['bias']).copy()))


def torch_grads_as_flax(field) -> dict:
  """The torch field's .grad in our flax param layout (numpy)."""
  layers = {f'trunk_{i}': m for i, m in enumerate(field.trunk)}
  layers.update(density=field.density, color_hidden=field.color_hidden, color=field.color)
  return {name: {'kernel': layer.weight.grad.numpy().T, 'bias': layer.bias.grad.numpy()}
          for name, layer in layers.items()}


_EPS = 1e-6


def torch_box_near_far(origins, dirs, lo, hi, near):
  """Slab test as render's box_near_far: near, far [...] (far = near + 1e-3 on a miss)."""
  torch = _torch()
  safe = torch.where(dirs.abs() < _EPS, torch.full_like(dirs, _EPS), dirs)
  t0, t1 = (lo - origins) / safe, (hi - origins) / safe
  t_enter = torch.minimum(t0, t1).amax(dim=-1)
  t_exit = torch.maximum(t0, t1).amin(dim=-1)
  n = torch.maximum(t_enter, near)
  hit = t_exit > n + 1e-3
  return n, torch.where(hit, t_exit, n + 1e-3)


def torch_trilinear_gather(volume, points, lo, hi):
  """volume [B, X, Y, Z, C], points [B, N, 3] -> [B, N, C]: 8 corner gathers of the flat
  volume (cell-centred, clamped to the border; i0 <= size - 2), the same sums as our lookup."""
  torch = _torch()
  b, c = volume.shape[0], volume.shape[-1]
  shape = torch.tensor(volume.shape[1:4], dtype=points.dtype)
  g = (points - lo) / (hi - lo) * shape - 0.5
  g = torch.minimum(torch.clamp(g, min=0.0), shape - 1.0)
  top = torch.clamp(torch.tensor(volume.shape[1:4]) - 2, min=0)
  i0 = torch.minimum(torch.clamp(torch.floor(g).long(), min=0), top)
  i1 = torch.minimum(i0 + 1, torch.tensor(volume.shape[1:4]) - 1)
  f = g - i0
  sy, sz = volume.shape[2] * volume.shape[3], volume.shape[3]
  # Per example rows of one flat [B * X * Y * Z, C] table.
  base = (torch.arange(b) * (volume.shape[1] * sy))[:, None]
  flat = volume.reshape(-1, c)
  out = 0.0
  for cx in (0, 1):
    ix, wx = (i1[..., 0], f[..., 0]) if cx else (i0[..., 0], 1 - f[..., 0])
    for cy in (0, 1):
      iy, wy = (i1[..., 1], f[..., 1]) if cy else (i0[..., 1], 1 - f[..., 1])
      for cz in (0, 1):
        iz, wz = (i1[..., 2], f[..., 2]) if cz else (i0[..., 2], 1 - f[..., 2])
        out = out + (wx * wy * wz)[..., None] * flat[base + ix * sy + iy * sz + iz]
  return out


def torch_trilinear_grid_sample(volume, points, lo, hi):
  """The same lookup with torch's fused grid_sample: [B, C, X, Y, Z] input (D=X, H=Y, W=Z), the
  grid's last axis ordered (W, H, D) = (z, y, x); align_corners=False puts -1 and 1 on the box
  faces, i.e. index = (u + 1) size / 2 - 0.5, and border padding clamps as ours."""
  torch = _torch()
  b, n = points.shape[:2]
  u = 2.0 * (points - lo) / (hi - lo) - 1.0
  grid = u.flip(-1).reshape(b, 1, 1, n, 3)
  out = torch.nn.functional.grid_sample(volume.permute(0, 4, 1, 2, 3), grid, mode='bilinear',
                                        padding_mode='border', align_corners=False)
  return out.reshape(b, -1, n).transpose(1, 2)


def torch_render(field, volume, background, origins, dirs, near, sizes: Sizes, jitter=None,
                 lookup: str = 'grid_sample') -> dict:
  """NSMAE.render in torch: volume [B, X, Y, Z, C], background logit [3], origins, dirs
  [B, R, 3], near [B, R], jitter [B, R, S] uniform in [0, 1) or None (bin centres) ->
  dict(color [B, R, 3], depth, opacity [B, R], weights, t [B, R, S])."""
  torch = _torch()
  lo, hi = field.lo, field.hi
  b, r = origins.shape[:2]
  s = sizes.num_samples
  n, f = torch_box_near_far(origins, dirs, lo, hi, near)
  width = (f - n) / s                                            # [B, R]
  offset = 0.5 if jitter is None else jitter
  t = n[..., None] + (torch.arange(s, dtype=origins.dtype) + offset) * width[..., None]
  deltas = width[..., None].expand(b, r, s)
  points = origins[:, :, None, :] + t[..., None] * dirs[:, :, None, :]   # [B, R, S, 3]
  interp = torch_trilinear_grid_sample if lookup == 'grid_sample' else torch_trilinear_gather
  feats = interp(volume, points.reshape(b, r * s, 3), lo, hi)    # [B, R * S, C]
  c = feats.shape[-1]
  density, color = field(feats.reshape(-1, c), points.reshape(-1, 3),
                         dirs[:, :, None, :].expand(b, r, s, 3).reshape(-1, 3))
  density, color = density.reshape(b, r, s), color.reshape(b, r, s, 3)
  tau = density * deltas
  cum = torch.cumsum(tau, dim=-1)
  trans = torch.exp(-torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1))
  weights = trans * (1.0 - torch.exp(-tau))
  left = torch.exp(-cum[..., -1])
  depth = (weights * t).sum(-1) + left * f
  rgb = (weights[..., None] * color).sum(-2) + left[..., None] * torch.sigmoid(background)
  return dict(color=rgb, depth=depth, opacity=weights.sum(-1), weights=weights, t=t)


class TorchTwin:
  """The torch field (our weights copied over) and the inputs as torch tensors; `step()` runs
  one forward + backward (fresh jitter from torch.rand) and returns the loss."""

  def __init__(self, sizes: Sizes, params: dict, inputs: dict[str, np.ndarray],
               lookup: str = 'grid_sample'):
    torch = _torch()
    self.sizes, self.lookup = sizes, lookup
    self.field = make_torch_field(sizes)
    load_flax_params(self.field, params)
    self.t = {k: torch.from_numpy(v.copy()) for k, v in inputs.items()}
    self.t['volume'].requires_grad_(True)
    self.t['background'].requires_grad_(True)

  def render(self, jitter=None) -> dict:
    x = self.t
    return torch_render(self.field, x['volume'], x['background'], x['origins'], x['dirs'],
                        x['near'], self.sizes, jitter, self.lookup)

  def step(self, jitter=None):
    torch = _torch()
    x = self.t
    for p in [*self.field.parameters(), x['volume'], x['background']]:
      p.grad = None
    if jitter is None:
      jitter = torch.rand(x['near'].shape + (self.sizes.num_samples,))
    out = self.render(jitter)
    loss = _loss(out['color'], out['depth'], x['target_color'], x['target_depth'], torch.mean,
                 torch.abs)
    loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------
# Timing


def _jax_call(sizes: Sizes, params: dict, inputs: dict[str, np.ndarray], seed: int):
  """() -> one jitted forward + backward of our renderer on `inputs`, blocked until done."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  grad_fn = jax_grad_fn(sizes)
  j = {k: jnp.asarray(v) for k, v in inputs.items()}
  args = (params, j['volume'], j['background'], j['origins'], j['dirs'], j['near'],
          jax.random.key(seed), j['target_color'], j['target_depth'])
  return lambda: jax.block_until_ready(grad_fn(*args))


def speedup(config_or_sizes, repeats: int = 5, seed: int = 0,
            lookups: tuple[str, ...] = ('grid_sample', 'gather'), warmup: int = WARMUP
            ) -> dict[str, Any]:
  """Times one forward + backward of our jitted renderer and of the torch twin at the same sizes.

  Args:
    config_or_sizes: a Config (its sizes_from_config) or a Sizes.
    repeats: rounds; in each, every implementation (ours, torch per lookup) runs 1 + warmup
      times in a row and the last call is timed. The first call after the other framework ran
      takes a different time (full.flags sizes, 2 cores: ours 7.4-9.3 s after a torch step vs
      4.8 s after one of ours; torch 5.6 s after ours vs 7.0-7.2 s after torch; the cause is
      not established, module docstring), which a training loop never sees; its time is
      reported as *_after_switch_seconds.
    lookups: the torch twin's trilinear forms to time ('grid_sample', 'gather').
    warmup: untimed calls of each implementation before its timed call in each round (>= 1;
      the module docstring says how long the switch penalty lasts).

  Returns:
    dict: jax_seconds, torch_seconds (the fastest lookup's median), torch_lookup (which),
    torch_<lookup>_seconds for each, renderer_speedup_vs_torch = torch_seconds / jax_seconds,
    the medians of the untimed-in-the-ratio first calls (jax_after_switch_seconds,
    torch_after_switch_seconds for the fastest lookup), jax_compile_seconds, the sizes
    (Sizes.describe()), threads, repeats, warmup.
  """
  if warmup < 1:
    raise ValueError(f'speedup: warmup must be >= 1 (the first call after a switch is never '
                     f'timed), got {warmup}')
  import jax  # pylint: disable=import-outside-toplevel
  torch = _torch()
  sizes = (config_or_sizes if isinstance(config_or_sizes, Sizes)
           else sizes_from_config(config_or_sizes))
  inputs = make_inputs(sizes, seed)
  params = init_params(sizes, seed)
  jax_call = _jax_call(sizes, params, inputs, seed)
  t0 = time.perf_counter()
  jax_call()
  compile_s = time.perf_counter() - t0
  twins = {lk: TorchTwin(sizes, params, inputs, lk) for lk in lookups}
  calls = {'jax': jax_call, **{lk: twin.step for lk, twin in twins.items()}}
  times, first = _interleaved(calls, repeats, warmup)
  med = {k: statistics.median(v) for k, v in times.items()}
  best = min(lookups, key=lambda lk: med[lk])
  out = dict(jax_seconds=med['jax'], torch_seconds=med[best], torch_lookup=best,
             **{f'torch_{lk}_seconds': med[lk] for lk in lookups},
             jax_after_switch_seconds=statistics.median(first['jax']),
             torch_after_switch_seconds=statistics.median(first[best]),
             renderer_speedup_vs_torch=med[best] / med['jax'], jax_compile_seconds=compile_s,
             torch_threads=torch.get_num_threads(), repeats=repeats, warmup=warmup,
             torch_version=torch.__version__, jax_version=jax.__version__)
  out.update(sizes.describe())
  return out


def _interleaved(calls: dict[str, Any], repeats: int, warmup: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Rounds of calls[k]() for each k in turn, 1 + warmup times in a row: per k, the seconds of
  each round's last call and of its first (the call right after another one ran)."""
  times: dict[str, list[float]] = {k: [] for k in calls}
  first: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      for i in range(1 + warmup):
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
        if i == 0:
          first[k].append(seconds)
      times[k].append(seconds)
  return times, first


# ---------------------------------------------------------------------------------------------
# The field MLP alone


def make_field_inputs(sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
  """Inputs of the field MLP alone for every sample of one renderer call (N = batch x rays, S
  samples): features [N, S, C] (what the lookup would give), points [N, S, 3] in the box, one
  unit view direction per ray [N, 1, 3], and cotangents for the density [N, S] and colour
  [N, S, 3] (the loss's gradient arriving from the compositing)."""
  rng = np.random.default_rng(seed)
  n, s, c = sizes.batch * sizes.rays, sizes.num_samples, sizes.channels
  dirs = rng.normal(size=(n, 1, 3))
  out = dict(features=rng.normal(size=(n, s, c)),
             points=rng.uniform(sizes.box_min, sizes.box_max, (n, s, 3)),
             dirs=dirs / np.linalg.norm(dirs, axis=-1, keepdims=True),
             g_density=rng.normal(size=(n, s)), g_color=rng.normal(size=(n, s, 3)))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def jax_field_grad_fn(sizes: Sizes):
  """jitted (params, make_field_inputs' dict) -> the gradients of sum(density g_density) +
  sum(colour g_color) w.r.t. the field's params and the features (what the renderer's backward
  asks of the field)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  field = jax_field(sizes)

  def pull(params, features, x):
    density, color = field.apply({'params': params}, features, x['points'], x['dirs'])
    return jnp.sum(density * x['g_density']) + jnp.sum(color * x['g_color'])
  grad = jax.grad(pull, argnums=(0, 1))
  return jax.jit(lambda params, x: grad(params, x['features'], x))


class TorchFieldTwin:
  """The torch field alone (our weights copied over) on make_field_inputs' tensors, the view
  direction repeated for every sample as torch_render passes it; `step()` is one forward +
  backward (field params and features)."""

  def __init__(self, sizes: Sizes, params: dict, field_inputs: dict[str, np.ndarray]):
    torch = _torch()
    self.field = make_torch_field(sizes)
    load_flax_params(self.field, params)
    x = {k: torch.from_numpy(v.copy()) for k, v in field_inputs.items()}
    n, s, c = x['features'].shape
    self.features = x['features'].reshape(n * s, c).requires_grad_(True)
    self.points = x['points'].reshape(n * s, 3)
    self.dirs = x['dirs'].expand(n, s, 3).reshape(n * s, 3)
    self.g_density, self.g_color = x['g_density'].reshape(-1), x['g_color'].reshape(-1, 3)

  def step(self):
    for p in [*self.field.parameters(), self.features]:
      p.grad = None
    density, color = self.field(self.features, self.points, self.dirs)
    ((density * self.g_density).sum() + (color * self.g_color).sum()).backward()


def field_speedup(sizes: Sizes, repeats: int = 5, seed: int = 0, warmup: int = WARMUP
                  ) -> dict[str, Any]:
  """The field MLP alone (positional encodings, trunk, density and colour heads; forward +
  backward w.r.t. its params and the features), ours jitted against the torch twin's, at the
  renderer's sizes, in interleaved rounds of speedup()'s protocol (rounds of their own): how
  much of the renderer's ratio the field's matmuls leave to the rest (lookup, its scatter-add,
  sampling, compositing).
  -> jax_field_seconds, torch_field_seconds, field_speedup_vs_torch (medians)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  params = init_params(sizes, seed)
  field_inputs = make_field_inputs(sizes, seed)
  grad_fn = jax_field_grad_fn(sizes)
  x = {k: jnp.asarray(v) for k, v in field_inputs.items()}
  calls = {'jax': lambda: jax.block_until_ready(grad_fn(params, x)),
           'torch': TorchFieldTwin(sizes, params, field_inputs).step}
  calls['jax']()  # compiled outside the rounds
  times, _ = _interleaved(calls, repeats, warmup)
  jax_s, torch_s = (statistics.median(times[k]) for k in ('jax', 'torch'))
  return dict(jax_field_seconds=jax_s, torch_field_seconds=torch_s,
              field_speedup_vs_torch=torch_s / jax_s)


def time_alone(sizes: Sizes, framework: str, repeats: int = 5, seed: int = 0) -> float:
  """Median seconds of one forward + backward of one renderer in this process, the other
  framework never run here: framework 'jax' (torch is not imported) or a torch lookup
  ('grid_sample', 'gather'). As in speedup(), each round runs it twice in a row and times the
  second call."""
  inputs = make_inputs(sizes, seed)
  params = init_params(sizes, seed)
  call = (_jax_call(sizes, params, inputs, seed) if framework == 'jax'
          else TorchTwin(sizes, params, inputs, framework).step)
  call()
  times = []
  for _ in range(repeats):
    call()
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def speedup_alone(sizes: Sizes, repeats: int = 5, lookup: str = 'grid_sample'
                  ) -> dict[str, float]:
  """Our renderer and the torch twin (one lookup) each timed in a fresh process of its own
  (time_alone through `python -m experiments.torch_twin --twin_alone=...`), as a training loop
  of either framework runs it. The two protocols move both sides (2 cores, AVX-512; medians of
  7 rounds): in speedup()'s shared process the torch steps slow ours down even on the second
  call after a switch (config sizes: ours 77.5 ms there, 65.5 ms alone), while torch is slower
  alone than after our steps (config: 122.5 vs 105.0 ms; 4096 x 64: 968 vs 740 ms; its large
  buffers then meet a fresh malloc heap, a guess not checked). Both ratios are reported.
  -> jax_alone_seconds, torch_alone_seconds, renderer_speedup_vs_torch_alone."""
  spec = json.dumps(dataclasses.asdict(sizes))
  out = {}
  for framework in ('jax', lookup):
    proc = launch.run_entry_point(
        'experiments.torch_twin', [f'--twin_alone={framework}', f'--twin_alone_sizes={spec}',
                                   f'--twin_repeats={repeats}'],
        capture_output=True, text=True, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
      raise RuntimeError(f'torch_twin --twin_alone={framework} failed (exit '
                         f'{proc.returncode}): {proc.stderr[-2000:]}')
    out['jax_alone_seconds' if framework == 'jax' else 'torch_alone_seconds'] = (
        json.loads(lines[-1])['seconds'])
  out['renderer_speedup_vs_torch_alone'] = out['torch_alone_seconds'] / out['jax_alone_seconds']
  return out


def _sizes_from_json(spec: str) -> Sizes:
  d = json.loads(spec)
  return Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def print_table(rows: list[dict]) -> None:
  print('renderer forward + backward (volume, field MLP, background), float32, CPU; median over '
        f'{rows[0]["repeats"] if rows else 0} rounds of the second of two calls in a row; '
        'speedup = torch / ours; "switch": the first call after the other framework ran; '
        '"alone": each in a process of its own (speedup_alone), --twin_alone_too')
  head = (f'{"size":<10} {"rays":>6} {"S":>3} {"volume":>12} {"C":>3} {"MLP":>6} '
          f'{"ours ms":>9} {"torch ms":>9} {"(lookup)":<12} {"gather ms":>10} {"speedup":>8} '
          f'{"switch: ours":>13} {"torch":>8} {"alone: ours":>12} {"torch":>8} {"speedup":>8}')
  print(head)
  for r in rows:
    vol = 'x'.join(map(str, r['volume_shape']))
    gather = r.get('torch_gather_seconds')
    print(f'{r["size"]:<10} {r["rays"]:>6} {r["num_samples"]:>3} {vol:>12} {r["channels"]:>3} '
          f'{r["field_width"]:>3}x{r["field_depth"]:<2} {r["jax_seconds"] * 1e3:9.1f} '
          f'{r["torch_seconds"] * 1e3:9.1f} {"(" + r["torch_lookup"] + ")":<12} '
          f'{"" if gather is None else f"{gather * 1e3:10.1f}":>10} '
          f'{r["renderer_speedup_vs_torch"]:8.2f} {r["jax_after_switch_seconds"] * 1e3:13.1f} '
          f'{r["torch_after_switch_seconds"] * 1e3:8.1f}'
          + (f' {r["jax_alone_seconds"] * 1e3:12.1f} {r["torch_alone_seconds"] * 1e3:8.1f} '
             f'{r["renderer_speedup_vs_torch_alone"]:8.2f}' if 'jax_alone_seconds' in r else ''))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from experiments import flags as nsflags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  if fv.twin_alone:  # one side of speedup_alone, in its own process
    seconds = time_alone(_sizes_from_json(fv.twin_alone_sizes), fv.twin_alone, fv.twin_repeats)
    print(json.dumps({'framework': fv.twin_alone, 'seconds': seconds}))
    return
  if not torch_available():
    print('torch_twin: torch is not installed (it is an optional extra, not a dependency of '
          'nsmae_jax); install a CPU build of torch to compare the renderer against it. '
          'Nothing timed.')
    return
  config = nsflags.config_from_flags()
  sizes = []
  if 'config' in fv.twin_sizes:
    sizes.append(sizes_from_config(config, 'config'))
  if 'full' in fv.twin_sizes:
    sizes.append(sizes_from_config(nsflags.config_from_flagfile(FULL_FLAGS), 'full'))
  if 'large' in fv.twin_sizes:
    sizes.append(LARGE)
  rows = []
  for s in sizes:
    rows.append(speedup(s, repeats=fv.twin_repeats, warmup=fv.twin_warmup))
    if fv.twin_alone_too:
      rows[-1].update(speedup_alone(s, repeats=fv.twin_repeats,
                                    lookup=rows[-1]['torch_lookup']))
    if fv.twin_field_split:
      rows[-1].update(field_speedup(s, repeats=fv.twin_repeats, warmup=fv.twin_warmup))
    print(f'{s.name}: ours {rows[-1]["jax_seconds"] * 1e3:.1f} ms, torch '
          f'{rows[-1]["torch_seconds"] * 1e3:.1f} ms', file=sys.stderr, flush=True)
  print_table(rows)
  for r in rows:
    if 'field_speedup_vs_torch' in r:
      print(f'{r["size"]}: the field MLP alone (forward + backward, its own rounds): ours '
            f'{r["jax_field_seconds"] * 1e3:.1f} ms, torch {r["torch_field_seconds"] * 1e3:.1f} '
            f'ms, speedup {r["field_speedup_vs_torch"]:.2f}; the rest of the renderer '
            f'(difference of the medians): ours '
            f'{(r["jax_seconds"] - r["jax_field_seconds"]) * 1e3:.1f} ms, torch '
            f'{(r["torch_seconds"] - r["torch_field_seconds"]) * 1e3:.1f} ms')
  if fv.twin_json_out:
    with open(fv.twin_json_out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  from absl import flags as _flags
  from experiments import flags as _nsflags
  _flags.DEFINE_integer('twin_repeats', 5, 'Rounds: each renderer runs 1 + --twin_warmup times '
                        'in a row per round, the last call timed.')
  _flags.DEFINE_integer('twin_warmup', WARMUP, 'Untimed calls of each renderer per round '
                        'before its timed call (the switch penalty; 1 = the protocol before '
                        'session 17).')
  _flags.DEFINE_list('twin_sizes', ['config', 'full', 'large'], 'Which sizes to time: config '
                     '(the flagfile\'s), full (experiments/configs/full.flags), large (4096 rays '
                     'x 64 samples, 128x128x8 volume of 32 channels).')
  _flags.DEFINE_string('twin_json_out', '', 'Write the rows as JSON to this file.')
  _flags.DEFINE_bool('twin_alone_too', True, 'Also time each side in a process of its own '
                     '(speedup_alone: the *_alone_seconds columns).')
  _flags.DEFINE_bool('twin_field_split', False, 'Also time the field MLP alone, ours against '
                     'the torch twin\'s (field_speedup: the *_field_seconds keys), and print '
                     'what the rest of the renderer takes on each side.')
  _flags.DEFINE_string('twin_alone', '', 'Internal (speedup_alone): time only this side (jax, '
                       'grid_sample or gather) at --twin_alone_sizes, print it as JSON.')
  _flags.DEFINE_string('twin_alone_sizes', '', 'Internal: the Sizes of --twin_alone, as JSON.')
  _nsflags.run(main)
