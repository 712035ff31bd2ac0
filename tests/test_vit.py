"""ViT camera encoder: exact MAE masking, encoder sees only visible tokens, FLOPs shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsmae_jax.models.vit import ViTEncoder, num_visible, random_keep

B, K, H, W, P = 1, 2, 32, 64, 8  # 4 x 8 = 32 tokens per camera


def _encoder(ratio):
  return ViTEncoder(patch=P, width=32, depth=2, heads=2, mlp_ratio=2, out_channels=8,
                    mask_ratio=ratio)


def _init(enc, images):
  """enc's parameters for images, jitted (an eager flax init compiles every initializer)."""
  return jax.jit(lambda im: enc.init({'params': jax.random.key(0), 'mask': jax.random.key(1)},
                                     im, True))(images)


@pytest.mark.parametrize('ratio', [0.25, 0.5, 0.75])
def test_masks_the_exact_fraction_per_camera(ratio):
  keep, masked = random_keep(jax.random.key(0), (3, 6), 44, num_visible(44, ratio))
  expected = round(ratio * 44)
  np.testing.assert_array_equal(np.asarray(masked).sum(-1), expected)
  for b in range(3):
    for k in range(6):
      assert not np.asarray(masked)[b, k, np.asarray(keep)[b, k]].any()
  assert not np.array_equal(masked[0, 0], masked[0, 1])  # cameras draw their own masks


@pytest.mark.slow  # compiles the ViT twice (fast tier: < 2 min)
def test_encoder_sees_only_visible_patches():
  enc = _encoder(0.5)
  images = np.random.default_rng(0).uniform(size=(B, K, H, W, 3)).astype(np.float32)
  params = _init(enc, images)
  apply = jax.jit(lambda im: enc.apply(params, im, True, rngs={'mask': jax.random.key(7)}))
  feats, masked = apply(images)
  assert feats.shape == (B, K, H // P, W // P, 8)
  masked = np.asarray(masked)
  assert masked.sum() == K * 16
  # Repaint every masked patch: the features do not change at all.
  pix = np.repeat(np.repeat(masked, P, axis=2), P, axis=3)
  other = np.where(pix[..., None], 1.0 - images, images).astype(np.float32)
  np.testing.assert_array_equal(apply(other)[0], feats)
  # Repainting a visible patch does change them.
  vis = np.argwhere(~masked[0, 0])[0]
  third = images.copy()
  third[0, 0, vis[0] * P:(vis[0] + 1) * P, vis[1] * P:(vis[1] + 1) * P] = 0.0
  assert not np.allclose(apply(third)[0], feats)


def _flops(ratio, mask=True):
  enc = _encoder(ratio)
  images = jnp.zeros((B, K, H, W, 3))
  params = _init(enc, images)
  fn = jax.jit(lambda p, im: enc.apply(p, im, mask, rngs={'mask': jax.random.key(0)})[0])
  cost = fn.lower(params, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops']


@pytest.mark.slow  # compiles the ViT at several mask ratios (fast tier: < 2 min)
def test_encoder_flops_shrink_with_the_mask_ratio():
  full = _flops(0.5, mask=False)
  f = [_flops(r) for r in (0.25, 0.5, 0.75)]
  assert full > f[0] > f[1] > f[2]
  # The transformer runs on visible tokens only: at 75% masking the cost is well below half.
  assert f[2] < 0.5 * full, (full, f)
