"""TFDS builder of `nuscenes_nsmae`: one record per nuScenes key frame (DESIGN.md "The record").

The builder does not parse nuScenes itself: `data_prep.convert_nuscenes` first writes one
record file per key frame (made by `record.make_record` through nuscenes-devkit, in parallel,
resumable; stored by `record_io`: plain arrays, checksummed, no pickle) under a record
directory, and this builder turns those into TFRecord shards. TFDS writes into a temporary
`incomplete.*` directory and renames it only when every split is written, so an interrupted
build never leaves a dataset that looks complete.

A converted dataset is read without project code:
`tfds.builder_from_directory(f'{data_dir}/nuscenes_nsmae/{config_name}/{VERSION}')`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as writer_lib

from data_prep.nuscenes_nsmae import record_io
from nsmae_jax.data.naming import VERSION, config_name, record_path
from nsmae_jax.data.schema import NUM_CAMERAS, NUM_MAP_CLASSES


@dataclasses.dataclass(eq=False)
class NuscenesNsmaeConfig(tfds.core.BuilderConfig):
  """Builder config: the record layout that the DataConfig asks for."""
  nuscenes_version: str = 'v1.0-trainval'
  image_height: int = 64
  image_width: int = 176
  num_sweeps: int = 1
  bev_half_extent: float = 32.0
  bev_resolution: float = 0.5

  @property
  def bev_cells(self) -> int:
    return int(round(2 * self.bev_half_extent / self.bev_resolution))


def builder_config(data_config: Any) -> NuscenesNsmaeConfig:
  """The builder config for a nsmae_jax.config.DataConfig."""
  return NuscenesNsmaeConfig(
      name=config_name(data_config), version=VERSION,
      description=(f'nuScenes {data_config.version}, images {data_config.image_height}x'
                   f'{data_config.image_width}, {data_config.num_sweeps} sweeps, BEV +-'
                   f'{data_config.bev_half_extent} m at {data_config.bev_resolution} m'),
      nuscenes_version=data_config.version, image_height=data_config.image_height,
      image_width=data_config.image_width, num_sweeps=data_config.num_sweeps,
      bev_half_extent=float(data_config.bev_half_extent),
      bev_resolution=float(data_config.bev_resolution))


def features(config: NuscenesNsmaeConfig) -> tfds.features.FeaturesDict:
  """The record's features; geometry in the key frame's LIDAR_TOP frame."""
  h, w, n = config.image_height, config.image_width, config.bev_cells
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      'token': tfds.features.Text(),
      'scene_name': tfds.features.Text(),
      'timestamp': tfds.features.Scalar(np.int64, doc='key frame time, microseconds'),
      'images': tfds.features.Sequence(
          tfds.features.Image(shape=(h, w, 3), encoding_format='jpeg'), length=NUM_CAMERAS),
      'intrinsics': tensor(shape=(NUM_CAMERAS, 3, 3), dtype=np.float32),
      'cam2lidar': tensor(shape=(NUM_CAMERAS, 4, 4), dtype=np.float32),
      'lidar2ego': tensor(shape=(4, 4), dtype=np.float32),
      'ego2global': tensor(shape=(4, 4), dtype=np.float32),
      # Raw bytes: a float list proto of 10^5 floats parses several times slower.
      'points': tensor(shape=(None, 5), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
      'bev_map': tensor(shape=(NUM_MAP_CLASSES, n, n), dtype=np.uint8,
                        encoding=tfds.features.Encoding.ZLIB),
      'boxes': tensor(shape=(None, 9), dtype=np.float32),
      'box_labels': tensor(shape=(None,), dtype=np.int32),
  })


class DeterministicExampleWriter(writer_lib.ExampleWriter):
  """Writes every tf.train.Example with its feature map in key order.

  TFDS serializes with SerializeToString(), which writes a proto map in an order that depends
  on the process (two conversions of the same records gave shards with the same examples but
  different bytes). Serializing again with deterministic=True makes a shard's bytes a function
  of its records, so a resumed conversion can be checked byte for byte against a fresh one.
  """

  def write(self, path, examples):
    def canonical():
      for key, serialized in examples:
        example = tf.train.Example.FromString(serialized)
        yield key, example.SerializeToString(deterministic=True)
    return super().write(path, canonical())


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for nuscenes_nsmae.

  Configs are made from a DataConfig (`builder_config`), never listed: TFDS refuses a custom
  config named like a listed one, and every config name is one that a DataConfig can make.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {'1.0.0': 'Initial release: images, calibration with ego-motion '
                            'compensation, multi-sweep points, BEV map masks, boxes.'}

  def __init__(self, *, record_dir: str | None = None, splits: dict[str, list[str]] | None = None,
               on_example: Callable[[str, dict], None] | None = None,
               on_prepared: Callable[[str], None] | None = None, **kwargs: Any):
    """record_dir/splits: where the converter's per-key-frame records are and which tokens
    each split holds (in order); on_example(split, record) sees every record written (with
    the converter's extras, for statistics); on_prepared(directory) may add files to the
    dataset directory while it still has its temporary name, so that they appear with the
    shards in TFDS' one rename. Only needed to build, not to read."""
    self._record_dir = record_dir
    self._split_tokens = splits or {}
    self._on_example = on_example
    self._on_prepared = on_prepared
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(self.builder_config),
        homepage='https://www.nuscenes.org/',
        description='nuScenes key frames for NS-MAE: 6 camera images, LiDAR sweeps, BEV map '
                    'masks and boxes; geometry in the key frame LIDAR_TOP frame.')

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    if self._on_prepared is not None:
      self._on_prepared(str(self.data_dir))  # TFDS points data_dir at its temporary directory

  def _example_writer(self) -> writer_lib.ExampleWriter:
    return DeterministicExampleWriter(file_format=self.info.file_format)

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._record_dir is None:
      raise ValueError('nuscenes_nsmae is built by data_prep.convert_nuscenes, not by '
                       'tfds.load / download_and_prepare directly')
    return {split: self._generate_examples(split, tokens)
            for split, tokens in self._split_tokens.items()}

  def _generate_examples(self, split: str, tokens: list[str]) -> Iterator[tuple[str, dict]]:
    for token in tokens:
      record = record_io.load_record(record_path(self._record_dir, split, token))
      if self._on_example is not None:
        self._on_example(split, record)
      yield token, record_io.features_only(record)
