"""Named model sizes (a small registry, scenic style) and their resolution against a Config."""

from __future__ import annotations

import dataclasses

from nsmae_jax.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """Widths and depths of every encoder; the Config's non-zero fields override them."""
  vit_width: int            # ViT token width
  vit_depth: int            # ViT transformer blocks
  vit_heads: int            # ViT attention heads
  vit_mlp_ratio: int        # ViT MLP hidden = ratio * width
  camera_channels: int      # camera feature-map channels after the refill neck (lifted)
  pillar_features: int      # PFN output channels
  bev_channels: int         # LiDAR BEV backbone / fused BEV map channels
  bev_blocks: int           # 3x3 convs per BEV backbone stage
  volume_channels: int      # fused 3D volume channels (the field's input feature)


MODEL_SIZES: dict[str, ModelSize] = {
    # CPU demo: a few hundred steps in minutes on 2 cores.
    'demo': ModelSize(vit_width=128, vit_depth=4, vit_heads=4, vit_mlp_ratio=4,
                      camera_channels=64, pillar_features=64, bev_channels=64, bev_blocks=2,
                      volume_channels=32),
    # The paper setting's scale: ViT-B/16-like camera encoder, PointPillars-like LiDAR branch.
    'base': ModelSize(vit_width=768, vit_depth=12, vit_heads=12, vit_mlp_ratio=4,
                      camera_channels=256, pillar_features=64, bev_channels=256, bev_blocks=3,
                      volume_channels=64),
}


def resolve_size(config: Config) -> ModelSize:
  """The named size of `config.model.model_size` with the Config's non-zero overrides applied."""
  m = config.model
  if m.model_size not in MODEL_SIZES:
    raise ConfigError(f'--model_size: unknown size {m.model_size!r}; known: '
                      f'{sorted(MODEL_SIZES)}')
  size = MODEL_SIZES[m.model_size]
  overrides = {name: getattr(m, name) for name in
               ('vit_width', 'vit_depth', 'vit_heads', 'pillar_features', 'bev_channels',
                'volume_channels') if getattr(m, name)}
  size = dataclasses.replace(size, **overrides)
  if size.vit_width % size.vit_heads:
    raise ConfigError(f'--vit_heads: {size.vit_heads} does not divide --vit_width='
                      f'{size.vit_width}')
  return size
