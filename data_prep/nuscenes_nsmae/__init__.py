"""Writing the `nuscenes_nsmae` TFDS dataset (the converter's side; readers need none of this).

- record: one key frame -> one record through nuscenes-devkit.
- nuscenes_nsmae_dataset_builder: the TFDS GeneratorBasedBuilder (imports TensorFlow).

Names and paths live in nsmae_jax.data.naming, the lists in nsmae_jax.data.schema. Readers use
`tfds.builder_from_directory(nsmae_jax.data.naming.dataset_dir(data_dir, data_config))`.
"""
