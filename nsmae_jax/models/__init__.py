"""NS-MAE networks (flax.linen, pure init/apply, sizes from the Config and MODEL_SIZES)."""

from nsmae_jax.models.backbone import NSMAEBackbone, compute_dtype
from nsmae_jax.models.sizes import MODEL_SIZES, ModelSize, resolve_size

__all__ = ['NSMAEBackbone', 'compute_dtype', 'MODEL_SIZES', 'ModelSize', 'resolve_size']
