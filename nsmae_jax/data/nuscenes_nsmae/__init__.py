"""The `nuscenes_nsmae` TFDS dataset.

- naming: config names and directories (derived from a DataConfig; no TensorFlow import).
- record: one key frame -> one record through nuscenes-devkit.
- nuscenes_nsmae_dataset_builder: the TFDS GeneratorBasedBuilder (imports TensorFlow).

Readers need none of this: `tfds.builder_from_directory(dataset_dir(data_dir, data_config))`.
"""

from nsmae_jax.data.nuscenes_nsmae.naming import (  # noqa: F401
    NAME, VERSION, config_name, dataset_dir, record_dir, record_path)
