"""Data: finding the data sets (`fetch`), reading images (`images`), one loader per data set
into the index table (`datasets`: the table and its checks; `kermany`, `nih`: the loaders), the Kermany tasks (`tasks`), patient-grouped splits
(`splits`), tf.data pipelines (`pipelines`), augmentation (`augment`) and cheap looks before
training (`explore`)."""
