"""NeRF-style volume renderer: pure jnp functions over rays (multinerf style).

Rays themselves (camera and BEV) come from nsmae_jax.geometry.

sampling.py    near/far from the volume box, stratified samples along rays, trilinear
               interpolation of the fused volume
guidance.py    LiDAR-guided samples (--sampling=lidar): occupancy grid of the LiDAR returns,
               inverse-CDF sample placement along rays
field.py       the field MLP (flax) on [volume feature, encoded point, encoded view direction]
compositing.py alpha compositing -> colour, expected depth, opacity, weights
render.py      `render_rays`: the above, vmapped over rays; `render_at`: given samples
"""

from nsmae_jax.render.compositing import composite
from nsmae_jax.render.field import RadianceField, positional_encoding
from nsmae_jax.render.render import render_at, render_rays
from nsmae_jax.render.sampling import box_near_far, stratified_samples, trilinear_interpolate

__all__ = ['composite', 'RadianceField', 'positional_encoding', 'box_near_far', 'render_at',
           'render_rays', 'stratified_samples', 'trilinear_interpolate']
