"""Pre-training losses (L2 colour, L1 depth; perspective and BEV views) and full-view renders.

Every term is weighted by its config.loss flag; a 0 weight switches it off (ablations) while
its metric is still reported. Losses average only over rays that have the target.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsmae_jax.config import Config
from nsmae_jax.pretrain import targets
from nsmae_jax.pretrain.targets import VIEWS


def _masked_mean(x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  valid = valid.astype(x.dtype)
  return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def view_terms(out: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
  """One view's rendered outputs and targets -> color_loss (mean squared error over channels
  and colour-valid rays), depth_loss (mean |d - d*| over depth-valid rays, m), psnr, and
  depth_abs_rel (mean |d - d*| / d*)."""
  se = jnp.mean((out['color'] - out['color_target']) ** 2, axis=-1)
  color = _masked_mean(se, out['color_valid'])
  err = jnp.abs(out['depth'] - out['depth_target'])
  depth = _masked_mean(err, out['depth_valid'])
  rel = _masked_mean(err / jnp.maximum(out['depth_target'], 1e-3), out['depth_valid'])
  psnr = -10.0 * jnp.log10(jnp.maximum(color, 1e-10))
  return dict(color_loss=color, depth_loss=depth, psnr=psnr, depth_abs_rel=rel)


def weighted_loss(config: Config, out: dict[str, dict]) -> tuple[jnp.ndarray, dict]:
  """{view: rendered outputs + targets [B, R, ...]} -> (loss [], metrics), see pretrain_loss."""
  weights = {'perspective': (config.loss.perspective_color_weight,
                             config.loss.perspective_depth_weight),
             'bev': (config.loss.bev_color_weight, config.loss.bev_depth_weight)}
  loss = jnp.zeros((), jnp.float32)
  metrics = {}
  for view in VIEWS:
    if view not in out:  # the config draws no rays of this view
      for name in ('color_loss', 'depth_loss', 'psnr', 'depth_abs_rel'):
        metrics[f'{view}_{name}'] = jnp.zeros(())
      continue
    terms = view_terms(out[view])
    w_color, w_depth = weights[view]
    # A Python-level switch, so a 0 weight removes the term from the graph (ablations).
    if w_color:
      loss = loss + w_color * terms['color_loss']
    if w_depth:
      loss = loss + w_depth * terms['depth_loss']
    for name, value in terms.items():
      metrics[f'{view}_{name}'] = value
  metrics['depth_abs_rel'] = metrics.pop('perspective_depth_abs_rel')
  metrics['loss'] = loss
  return loss, metrics


def pretrain_loss(model, params: Any, batch: dict, rng: jax.Array,
                  train: bool = True) -> tuple[jnp.ndarray, dict]:
  """The weighted NS-MAE loss of one per-device batch.

  Args:
    model: an NSMAE (pretrain.build_pretrain_model(config)).
    params: its params ({'backbone', 'field'}).
    batch: the batch contract, leading [B].
    rng: a PRNGKey already folded with step/device; split here into masks, rays and jitter.
    train: masking + stratified jitter; False = unmasked inputs, bin-centre samples (eval).

  Returns:
    loss [] and aux = {'metrics': {loss, <view>_color_loss, <view>_depth_loss, <view>_psnr,
    depth_abs_rel (perspective, LiDAR rays), bev_depth_abs_rel}}.
  """
  cfg: Config = model.config
  k_mask, k_rays, k_render = jax.random.split(rng, 3)
  rays = targets.draw_rays(cfg, k_rays, batch)
  _, rendered = model.apply({'params': params}, batch, rays, train=train,
                            rngs={'mask': k_mask, 'render': k_render})
  out = {}
  for view, r in rendered.items():
    tg = rays[view]
    out[view] = dict(color=r['color'], depth=r['depth'], opacity=r['opacity'],
                     color_target=tg['color'], depth_target=tg['depth'],
                     color_valid=tg['color_valid'] & r['hit'],
                     depth_valid=tg['depth_valid'] & r['hit'])
  loss, metrics = weighted_loss(cfg, out)
  return loss, {'metrics': metrics}


@functools.lru_cache(maxsize=4)
def _view_fns(model, camera: int):
  """Jitted pieces of render_views, cached per (model, camera); a model is a frozen config."""

  @jax.jit
  def prepare(params, ex):
    """-> volume [1, X, Y, Z, C], all rays (perspective then BEV) and the targets."""
    volume = model.apply({'params': params}, ex, mask=False, method=model.encode)['volume']
    rays, tg = targets.full_view_rays(model.config, {k: v[0] for k, v in ex.items()}, camera)
    return volume, rays, tg

  @jax.jit
  def render(params, volume, origins, dirs, near):
    out = model.apply({'params': params}, volume, origins[None], dirs[None], near[None], None,
                      method=model.render)
    return out['color'][0], out['depth'][0]

  return prepare, render


def render_views(model, params: Any, batch: dict, rng: jax.Array | None = None,
                 camera: int = 0, max_rays_per_chunk: int = 4096) -> dict[str, np.ndarray]:
  """Renders example 0 fully with unmasked inputs and deterministic samples.

  Returns numpy arrays: perspective_color [H, W, 3], perspective_depth [H, W] (range along the
  ray, m), bev_color [X, Y, 3], bev_depth [X, Y] (from the volume top, m), and the targets of
  targets.full_view_rays, with [X, Y] the fused volume's x-y grid (LiDAR frame).
  """
  del rng  # eval rendering is deterministic
  cfg: Config = model.config
  ex = {k: jnp.asarray(np.asarray(batch[k])[:1])
        for k in ('images', 'intrinsics', 'cam2lidar', 'points', 'points_mask')}
  prepare, render = _view_fns(model, camera)
  volume, rays, tg = prepare(params, ex)
  origins, dirs, near = rays['origins'], rays['dirs'], rays['near']
  n = origins.shape[0]
  chunk = min(max_rays_per_chunk, n)
  pad = (-n) % chunk
  # One chunk shape for both views: a single compilation.
  padded = [jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]) for a in (origins, dirs, near)]
  colors, depths = [], []
  for s in range(0, n + pad, chunk):
    c, d = render(params, volume, *(a[s:s + chunk] for a in padded))
    colors.append(np.asarray(c))
    depths.append(np.asarray(d))
  color, depth = np.concatenate(colors)[:n], np.concatenate(depths)[:n]
  h, w = cfg.data.image_height, cfg.data.image_width
  nx, ny = cfg.volume_shape[:2]
  out = dict(perspective_color=color[:h * w].reshape(h, w, 3),
             perspective_depth=depth[:h * w].reshape(h, w),
             bev_color=color[h * w:].reshape(nx, ny, 3), bev_depth=depth[h * w:].reshape(nx, ny))
  out.update({k: np.asarray(v, np.float32) for k, v in tg.items()})
  return out
