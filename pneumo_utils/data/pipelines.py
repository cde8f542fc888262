"""tf.data input pipelines over image paths, class weights and seeding.

Images are decoded in parallel and batched; the pipeline reads paths from the index (see
:mod:`pneumo_utils.data.splits`).
"""

from __future__ import annotations

import os
import random

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from pneumo_utils.data.images import read_resized


def set_seed(seed: int, deterministic_ops: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic.

    Op determinism makes two runs with the same seed give identical weights on CPU,
    at some cost in speed for a few kernels.
    """
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced class weights ``n / (2 * n_c)`` for Keras' ``class_weight`` (scikit-learn)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def image_dataset(
    paths: list[str],
    labels: np.ndarray | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = True,
):
    """A tf.data pipeline of resized RGB images from file paths.

    Decoding runs in parallel (Pillow/pydicom through :func:`read_resized`, which handles
    JPEG, PNG of any mode, DICOM and very large images), decoded ``uint8`` images are cached
    (in memory, or in a file when ``cache`` is a path) so later epochs skip decoding, and
    batches are prefetched. Backbone preprocessing lives inside the models, so the pipeline
    yields raw pixel values.

    Yields ``float32`` batches of shape ``(batch, image_size, image_size, 3)`` in 0-255,
    paired with ``float32`` labels of shape ``(batch,)`` when ``labels`` is given.
    """
    import tensorflow as tf

    def load(path):
        image = tf.numpy_function(
            lambda p: read_resized(p.decode(), image_size), [path], tf.uint8, stateful=False
        )
        image.set_shape((image_size, image_size, 3))
        return image

    autotune = tf.data.AUTOTUNE
    images = tf.data.Dataset.from_tensor_slices(list(paths)).map(load, num_parallel_calls=autotune)
    if labels is not None:
        targets = tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.float32))
        ds = tf.data.Dataset.zip((images, targets))
    else:
        ds = images
    if cache:
        ds = ds.cache("" if cache is True else str(cache))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if labels is not None:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    else:
        ds = ds.map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def load_images(paths: list[str], image_size: int = 224) -> np.ndarray:
    """Decode a few images into one ``(n, size, size, 3)`` float32 array (0-255), for figures."""
    return np.stack([read_resized(p, image_size) for p in paths]).astype(np.float32)
