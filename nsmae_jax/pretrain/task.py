"""The NS-MAE pre-training Task for the generic training loop (nsmae_jax.train)."""

from __future__ import annotations

import jax

from nsmae_jax.config import Config
from nsmae_jax.pretrain import losses, targets
from nsmae_jax.pretrain.model import build_pretrain_model
from nsmae_jax.train.task import Task


def pretrain_task(config: Config) -> Task:
  """NS-MAE pre-training: masked LiDAR + camera encoders rendered into colour and depth."""
  model = build_pretrain_model(config)

  def init_params(rng, batch):
    k_params, k_mask, k_rays, k_render = jax.random.split(rng, 4)
    rays = targets.draw_rays(config, k_rays, batch)
    return model.init({'params': k_params, 'mask': k_mask, 'render': k_render}, batch, rays,
                      train=True)['params']

  def loss_fn(params, batch, rng, train):
    return losses.pretrain_loss(model, params, batch, rng, train=train)

  def render_images(params, batch, rng):
    return losses.render_views(model, params, batch, rng, camera=0)

  return Task(name='pretrain', model=model, init_params=init_params, loss_fn=loss_fn,
              render_images=render_images,
              headline=('loss', 'perspective_psnr', 'bev_psnr', 'depth_abs_rel'))
