"""Pre-training losses (L2 colour, L1 depth; perspective and BEV views) and full-view renders.

Every term is weighted by its config.loss flag; a 0 weight switches it off (ablations) while
its metric is still reported. Losses average only over rays that have the target, each target
weighted by `target_weights` (MAE: masked content scored, or weighted up, per --masked_loss).
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

TERMS = ('color_loss', 'depth_loss', 'psnr', 'depth_abs_rel')


def _masked_mean(x: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  weight = weight.astype(x.dtype)
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


def view_terms(out: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
  """One view's rendered outputs and targets -> color_loss (mean squared error over channels,
  weighted by color_valid), depth_loss (weighted mean |d - d*| over depth_valid, m), psnr, and
  depth_abs_rel (mean |d - d*| / d*). color_valid / depth_valid: bool or float weights."""
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
      for name in TERMS:
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


def hidden_targets(config: Config, rays: dict, feats: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Which targets of one view were hidden from the encoder.

  A colour target is hidden when its source pixel lies in a masked image patch; a depth target
  when its point lies in a dropped LiDAR block (a fused-volume x-y cell): each target is hidden
  when the modality it was read from was masked there.

  Args:
    rays: one view of targets.draw_rays (image_source [B, R, 3], lidar_cell [B, R, 2]).
    feats: the encoder's outputs (image_mask [B, K, gh, gw], lidar_block_mask [B, X, Y]).

  Returns:
    color_hidden, depth_hidden [B, R] bool.
  """
  p = config.model.patch_size
  src, cell = rays['image_source'], rays['lidar_cell']
  color = jax.vmap(lambda m, s: m[s[:, 0], s[:, 1] // p, s[:, 2] // p])(feats['image_mask'], src)
  depth = jax.vmap(lambda m, c: m[c[:, 0], c[:, 1]])(feats['lidar_block_mask'], cell)
  return color, depth


def target_weights(config: Config, rays: dict, feats: dict, mode: str
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-target loss weights [B, R] (colour, depth) of one view under --masked_loss `mode`:
  all = 1; masked = 1 on hidden targets, 0 elsewhere; weighted = masked_weight on hidden, 1
  elsewhere. With --background=exclude, background rays get no colour weight."""
  color_hidden, depth_hidden = hidden_targets(config, rays, feats)

  def weigh(hidden):
    if mode == 'all':
      return jnp.ones(hidden.shape, jnp.float32)
    if mode == 'masked':
      return hidden.astype(jnp.float32)
    return jnp.where(hidden, config.loss.masked_weight, 1.0).astype(jnp.float32)

  color, depth = weigh(color_hidden), weigh(depth_hidden)
  if config.render.background == 'exclude':
    color = jnp.where(rays['background'], 0.0, color)
  return color, depth


def _scored(config: Config, rays: dict, feats: dict, rendered: dict, mode: str) -> dict:
  """{view: outputs + targets with per-target weights in color_valid / depth_valid}."""
  out = {}
  for view, r in rendered.items():
    tg = rays[view]
    w_color, w_depth = target_weights(config, tg, feats, mode)
    out[view] = dict(color=r['color'], depth=r['depth'], opacity=r['opacity'],
                     color_target=tg['color'], depth_target=tg['depth'],
                     color_valid=(tg['color_valid'] & r['hit']) * w_color,
                     depth_valid=(tg['depth_valid'] & r['hit']) * w_depth)
  return out


def pretrain_loss(model, params: Any, batch: dict, rng: jax.Array,
                  train: bool = True) -> tuple[jnp.ndarray, dict]:
  """The weighted NS-MAE loss of one per-device batch.

  Rays and targets are drawn once, from the unmasked batch (targets.draw_rays); the masks are
  drawn inside the encoder, and each target's weight follows from whether its source was masked
  (target_weights).

  Args:
    model: an NSMAE (pretrain.build_pretrain_model(config)).
    params: its params ({'backbone', 'field', 'bev_decoder'[, 'background']}).
    batch: the batch contract, leading [B].
    rng: a PRNGKey already folded with step/device; split here into masks, rays and jitter.
    train: masking + stratified jitter, targets weighted per --masked_loss. False (eval):
      bin-centre samples, twice: unmasked inputs with every target scored (plain
      auto-encoding; the loss and the train metrics' keys), and masked inputs scored on the
      hidden targets only (the MAE figure; the same keys prefixed 'masked_').

  Returns:
    loss [] and aux = {'metrics': {loss, <view>_color_loss, <view>_depth_loss, <view>_psnr,
    depth_abs_rel (perspective, LiDAR rays), bev_depth_abs_rel[, masked_<each> (eval)]}}.
  """
  cfg: Config = model.config
  k_mask, k_rays, k_render = jax.random.split(rng, 3)
  rays = targets.draw_rays(cfg, k_rays, batch)
  apply = lambda mask: model.apply({'params': params}, batch, rays, train=train, mask=mask,
                                   rngs={'mask': k_mask, 'render': k_render})
  if train:
    feats, rendered = apply(True)
    loss, metrics = weighted_loss(cfg, _scored(cfg, rays, feats, rendered, cfg.loss.masked_loss))
    return loss, {'metrics': metrics}
  feats, rendered = apply(False)
  loss, metrics = weighted_loss(cfg, _scored(cfg, rays, feats, rendered, 'all'))
  feats, rendered = apply(True)
  _, masked = weighted_loss(cfg, _scored(cfg, rays, feats, rendered, 'masked'))
  metrics.update({f'masked_{k}': v for k, v in masked.items()})
  return loss, {'metrics': metrics}


@functools.lru_cache(maxsize=4)
def _view_fns(model, camera: int):
  """Jitted pieces of render_views, cached per (model, camera); a model is a frozen config."""

  @jax.jit
  def prepare(params, ex):
    """-> {view: volume [1, X, Y, Z, C]}, the occupancy grid (None unless --sampling=lidar),
    all rays (perspective then BEV) and the targets."""
    volumes, occupancy = model.apply({'params': params}, ex, method=lambda m, b: (
        m.view_volumes(m.encode(b, mask=False)), m.occupancy(b)))
    rays, tg = targets.full_view_rays(model.config, {k: v[0] for k, v in ex.items()}, camera)
    return volumes, occupancy, rays, tg

  @jax.jit
  def render(params, volume, occupancy, origins, dirs, near):
    out = model.apply({'params': params}, volume, origins[None], dirs[None], near[None], None,
                      occupancy, method=model.render)
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
  volumes, occupancy, rays, tg = prepare(params, ex)
  h, w = cfg.data.image_height, cfg.data.image_width
  n_p = h * w
  chunk = min(max_rays_per_chunk, n_p)
  colors, depths = [], []
  # Each view renders its own volume; one chunk shape for both: a single compilation.
  for view, sl in (('perspective', slice(0, n_p)), ('bev', slice(n_p, None))):
    view_rays = [rays[k][sl] for k in ('origins', 'dirs', 'near')]
    n = view_rays[0].shape[0]
    pad = (-n) % chunk
    padded = [jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]) for a in view_rays]
    for start in range(0, n, chunk):
      c, d = render(params, volumes[view], occupancy,
                    *(a[start:start + chunk] for a in padded))
      colors.append(np.asarray(c)[:n - start])
      depths.append(np.asarray(d)[:n - start])
  color, depth = np.concatenate(colors), np.concatenate(depths)
  nx, ny = cfg.volume_shape[:2]
  out = dict(perspective_color=color[:h * w].reshape(h, w, 3),
             perspective_depth=depth[:h * w].reshape(h, w),
             bev_color=color[h * w:].reshape(nx, ny, 3), bev_depth=depth[h * w:].reshape(nx, ny))
  out.update({k: np.asarray(v, np.float32) for k, v in tg.items()})
  return out
