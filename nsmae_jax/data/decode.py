"""One serialized record -> one fixed-shape numpy example (the per-example half of the pipeline).

NumPy, OpenCV and TFDS' NumPy decoding only (no TensorFlow), so it runs the same in the main
process, in grain's reader threads and in grain worker processes. Randomness (point subsampling
when N > P, augmentation) comes from generators seeded by (seed, stream position, purpose), so
an example is a function of its record, the seed and its place in the stream.

Output, geometry in the key frame's LIDAR_TOP frame: images float32 [6, H, W, 3] in [0, 1];
intrinsics float32 [6, 3, 3]; cam2lidar float32 [6, 4, 4]; points float32 [P, 5] (x, y, z,
intensity, time lag) with points_mask bool [P]; bev_map uint8 [6, Hb, Wb]; boxes float32 [M, 9]
with boxes_mask bool [M]; box_labels int32 [M]; eval examples add valid bool [].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nsmae_jax.data import augment as augment_lib
from nsmae_jax.data.shards import ShardError, ShardIndex

# Purposes of the per-example generators: independent streams, so turning augmentation on does
# not change which points are kept.
_SUBSAMPLE, _AUGMENT = 0, 1


def fit(example: dict[str, Any], max_points: int, max_boxes: int,
        rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Images to [0, 1]; points to P (seeded subsample or zero pad), boxes to M, with masks.

  Args:
    example: a record as TFDS' numpy decoding gives it (images a list of 6 uint8 [H, W, 3],
      points [N, 5], boxes [K, 9], box_labels [K], ...).
    max_points: P; max_boxes: M (the M boxes nearest the LiDAR when there are more).
    rng: draws the kept points when N > P.

  Returns:
    The per-example arrays of the module docstring (without valid).
  """
  points = example['points']
  n = len(points)
  if n > max_points:
    # A random subset kept in the stored order (key frame first, then older sweeps).
    points = points[np.sort(rng.choice(n, max_points, replace=False))]
  padded = np.zeros((max_points, 5), np.float32)
  padded[:len(points)] = points
  # When a frame has more than M boxes, the M nearest to the sensor are kept (the far ones are
  # the first to fall outside the BEV grid and the evaluator's class ranges), not the first M
  # in annotation order.
  keep = np.argsort(np.hypot(example['boxes'][:, 0], example['boxes'][:, 1]),
                    kind='stable')[:max_boxes]
  boxes, labels = example['boxes'][keep], example['box_labels'][keep]
  out_boxes = np.zeros((max_boxes, 9), np.float32)
  out_boxes[:len(boxes)] = boxes
  out_labels = np.zeros((max_boxes,), np.int32)
  out_labels[:len(labels)] = labels
  images = np.stack(example['images'])  # uint8 [6, H, W, 3]
  return {
      'images': images.astype(np.float32) * np.float32(1.0 / 255.0),
      'intrinsics': np.asarray(example['intrinsics'], np.float32),
      'cam2lidar': np.asarray(example['cam2lidar'], np.float32),
      'points': padded,
      'points_mask': np.arange(max_points) < len(points),
      'bev_map': np.asarray(example['bev_map'], np.uint8),
      'boxes': out_boxes,
      'boxes_mask': np.arange(max_boxes) < len(boxes),
      'box_labels': out_labels,
  }


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Decodes the record at a stream position (a grain map-with-index callable; picklable).

  Attributes:
    index: the shards, to name the one behind a record that fails to decode.
    features: the dataset's TFDS FeaturesDict (decoded with deserialize_example_np).
    seed: config.train.seed.
    max_points, max_boxes: P and M.
    bev_half_extent, bev_resolution: the BEV grid (for augmentation).
    augmentation: None for none.
    num_valid: eval only: stream positions >= this are padding (valid False); None for train.
  """
  index: ShardIndex
  features: Any
  seed: int
  max_points: int
  max_boxes: int
  bev_half_extent: float
  bev_resolution: float
  augmentation: augment_lib.Augmentation | None = None
  num_valid: int | None = None

  def __call__(self, position: int, item: tuple[int, bytes]) -> dict[str, np.ndarray]:
    record, data = item
    try:
      example = self.features.deserialize_example_np(data)
      if self.augmentation is not None:
        example = augment_lib.random_global_transform(
            example, self.augmentation, self.bev_half_extent, self.bev_resolution,
            np.random.default_rng([self.seed, position, _AUGMENT]))
      out = fit(example, self.max_points, self.max_boxes,
                np.random.default_rng([self.seed, position, _SUBSAMPLE]))
    except ShardError:
      raise
    # A damaged record fails in many ways (protobuf, JPEG, zlib, a wrong size): trace any of
    # them to its shard, and say whether the bytes fail their CRC.
    except Exception as e:  # pylint: disable=broad-except
      raise self.index.error(record, e) from e
    if self.num_valid is not None:
      out['valid'] = np.bool_(position < self.num_valid)
    return out
