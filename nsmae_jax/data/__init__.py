"""Input data: the schema, names and paths of the converted dataset, the grain input pipeline
over its TFRecord shards (pipeline, decode, augment, shards), label subsets, fake batches."""
