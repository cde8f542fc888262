"""Beyond one machine: `tf.distribute` strategies and mixed precision (`distribute`), and
TFRecord shards of an index with a reader split by file (`shards`)."""
