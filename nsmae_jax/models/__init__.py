"""NS-MAE networks (flax.linen, pure init/apply, sizes from the Config and MODEL_SIZES)."""

from nsmae_jax.models.nsmae import (NSMAE, NSMAEBackbone, build_pretrain_model, compute_dtype,
                                    param_groups)
from nsmae_jax.models.sizes import MODEL_SIZES, ModelSize, resolve_size

__all__ = ['NSMAE', 'NSMAEBackbone', 'build_pretrain_model', 'compute_dtype', 'param_groups',
           'MODEL_SIZES', 'ModelSize', 'resolve_size']
