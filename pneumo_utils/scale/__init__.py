"""Beyond one machine: `tf.distribute` strategies (`distribute`), and
TFRecord shards of an index (`shard_manifest`: the manifest and its checks; `shard_writer`;
`shard_reader`: a tf.data reader split by file, figures' images, features; `shard_command`)."""
