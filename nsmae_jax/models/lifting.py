"""Geometric lifting: per-camera feature maps -> a voxel volume in the LiDAR frame.

Every voxel centre is projected into every camera with its intrinsics and cam2lidar (the
devkit's projection; nsmae_jax.geometry holds the pixel convention), the feature map is sampled
bilinearly there, and the samples are averaged over the cameras that see the voxel. Voxels that
no camera sees get a learned embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsmae_jax.geometry import bilinear_sample, grid_centers, in_image, project_points


def lift_features(features: jnp.ndarray, intrinsics: jnp.ndarray, cam2lidar: jnp.ndarray,
                  volume_shape: tuple[int, int, int], box_min, box_max,
                  image_hw: tuple[int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Lifts one example's camera features into the volume.

  Args:
    features: [K, h, w, C] per-camera feature maps; intrinsics [K, 3, 3] for image_hw;
    cam2lidar [K, 4, 4].

  Returns:
    volume [X, Y, Z, C] (mean over the cameras that see each voxel, 0 where none) and
    seen [X, Y, Z] (how many cameras see each voxel).
  """
  centres = grid_centers(volume_shape, box_min, box_max).reshape(-1, 3)

  def one_camera(fm, k, c2l):
    uv, _, front = project_points(centres, k, c2l)
    vis = (front & in_image(uv, *image_hw)).astype(fm.dtype)
    return bilinear_sample(fm, uv, image_hw) * vis[:, None], vis

  sampled, vis = jax.vmap(one_camera)(features, intrinsics, cam2lidar)   # [K, N, C], [K, N]
  seen = jnp.sum(vis, axis=0)
  volume = jnp.sum(sampled, axis=0) / jnp.maximum(seen, 1.0)[:, None]
  return (volume.reshape(volume_shape + (features.shape[-1],)), seen.reshape(volume_shape))


class CameraLifting(nn.Module):
  """Projects camera features to `channels`, lifts them, fills unseen voxels."""
  volume_shape: tuple[int, int, int]
  box_min: tuple[float, float, float]
  box_max: tuple[float, float, float]
  image_hw: tuple[int, int]
  channels: int
  dtype: Any = jnp.float32
  remat: bool = False  # recompute the per-camera samples in the backward pass

  @nn.compact
  def __call__(self, features: jnp.ndarray, intrinsics: jnp.ndarray,
               cam2lidar: jnp.ndarray) -> jnp.ndarray:
    """features [B, K, h, w, C], intrinsics [B, K, 3, 3], cam2lidar [B, K, 4, 4] ->
    [B, X, Y, Z, channels] LiDAR frame."""
    # Projecting before lifting is the same linear map, on h*w*K cells rather than X*Y*Z*K.
    f = nn.Dense(self.channels, dtype=self.dtype, name='proj')(features)
    lift = lambda a, b, c: lift_features(a, b, c, self.volume_shape, self.box_min, self.box_max,
                                         self.image_hw)
    if self.remat:  # keeps only the feature maps: no [K, X*Y*Z, C] samples for the backward
      lift = jax.checkpoint(lift)
    vol, seen = jax.vmap(lift)(f, jnp.asarray(intrinsics, jnp.float32),
                               jnp.asarray(cam2lidar, jnp.float32))
    unseen = self.param('unseen_embed', nn.initializers.normal(0.02), (self.channels,))
    return jnp.where(seen[..., None] > 0, vol, unseen.astype(vol.dtype))
