"""Input data: the tf.data pipeline over converted shards, and fake batches for tests."""
