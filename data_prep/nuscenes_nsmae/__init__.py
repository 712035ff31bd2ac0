"""Writing the `nuscenes_nsmae` TFDS dataset (the converter's side; readers need none of this).

- record: one key frame -> one record through nuscenes-devkit.
- record_io: the record file (checksummed .npz of plain arrays, read without pickle).
- record_workers: stage 1, the record files of all key frames in worker processes.
- nuscenes_nsmae_dataset_builder: the TFDS GeneratorBasedBuilder (imports TensorFlow).

Names and paths live in nsmae_jax.data.naming, the lists in nsmae_jax.data.schema. Readers use
`tfds.builder_from_directory(nsmae_jax.data.naming.dataset_dir(data_dir, data_config))`.
"""
