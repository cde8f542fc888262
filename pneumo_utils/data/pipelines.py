"""tf.data input pipelines over image paths, class weights and seeding.

Images are decoded in parallel and batched; the pipeline reads paths from the index (see
:mod:`pneumo_utils.data.splits`). Plain 8-bit JPEG and PNG files are decoded and resized by
TensorFlow ops, to the same pixels as :func:`pneumo_utils.data.images.read_resized`; every
other file (DICOM, 16-bit, palette or transparent PNG, rotated or CMYK JPEG, damaged
files, files above :data:`~pneumo_utils.data.image_checks.GRAPH_PIXELS` pixels) goes through
``read_resized`` itself.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from pneumo_utils.data.image_checks import GraphDecode, checked_readable, graph_decode
from pneumo_utils.data.images import read_resized

DECODER = "graph-jpeg-png-2"
"""Names the decoding that :func:`image_dataset` does (which files TensorFlow decodes, and
how). Part of the feature-cache key (:mod:`pneumo_utils.model.features`): features computed
from pixels decoded another way are not reused."""


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
    """A tf.data pipeline of resized RGB images from file paths, in the order of ``paths``.

    When the pipeline is built, each file's header is read and the file checked for damage
    (:func:`~pneumo_utils.data.image_checks.graph_decode`, in threads; the damage check is skipped
    for files that :func:`~pneumo_utils.data.image_checks.check_images` already found readable, as
    the data set loaders do). Plain 8-bit gray or RGB JPEG and PNG files are then decoded and
    resized by TensorFlow ops, which run in parallel without the GIL and can be traced, to
    the pixels :func:`read_resized` gives (libjpeg's accurate integer IDCT and reduced-scale
    decoding, Pillow's block averaging, OpenCV's area shrinking and bilinear enlarging; at
    most 1 grey level apart, where OpenCV rounds a half the other way). Every other file goes
    through :func:`read_resized` in a ``tf.numpy_function``: DICOM, PNG of other modes and
    depths, rotated or CMYK JPEGs, images above ``GRAPH_PIXELS``, and damaged or unreadable
    files, whose error (``ImageReadError`` naming the file) is raised when the pipeline
    reaches them.
    Decoded ``uint8`` images are cached (in memory, or in a file when ``cache`` is a path) so
    later epochs skip decoding, and batches are prefetched. Backbone preprocessing lives
    inside the models, so the pipeline yields raw pixel values.

    Yields ``float32`` batches of shape ``(batch, image_size, image_size, 3)`` in 0-255,
    paired with ``float32`` labels of shape ``(batch,)`` when ``labels`` is given.
    """
    import tensorflow as tf

    paths = [str(p) for p in paths]
    verified = checked_readable(paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        plans = list(pool.map(lambda p, v: graph_decode(p, image_size, verified=v), paths, verified))
    routes = sorted({_route(plan) for plan in plans}, key=str) or [()]  # [()]: no paths
    readers = [_reader(route, image_size) for route in routes]
    branch = np.array([routes.index(_route(plan)) for plan in plans], dtype=np.int32)
    box = np.array([plan.box if plan else 1 for plan in plans], dtype=np.int32)

    def load(path, index, factor):
        image = tf.switch_case(index, [lambda r=r: r(path, factor) for r in readers])
        image.set_shape((image_size, image_size, 3))
        return image

    autotune = tf.data.AUTOTUNE
    images = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), branch, box)).map(
        load, num_parallel_calls=autotune)
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


def _route(plan: GraphDecode | None) -> tuple:
    """The decoding branch of one file: ``()`` for :func:`read_resized`, else the decoder
    settings that must be fixed in the graph (format, channels, JPEG ratio)."""
    return () if plan is None else (plan.format, plan.channels, plan.jpeg_ratio)


def _reader(route: tuple, image_size: int):
    """``read(path, box) -> (image_size, image_size, 3) uint8`` for one decoding branch."""
    import tensorflow as tf

    if not route:
        def read_python(path, box):
            return tf.numpy_function(lambda p: read_resized(p.decode(), image_size), [path],
                                     tf.uint8, stateful=False)
        return read_python

    image_format, channels, ratio = route

    def read_graph(path, box):
        data = tf.io.read_file(path)
        if image_format == "JPEG":
            image = tf.io.decode_jpeg(data, channels=channels, ratio=ratio,
                                      dct_method="INTEGER_ACCURATE")
        else:
            image = tf.io.decode_png(data, channels=channels)
        image = _resize_as_read_resized(_box_reduce(image, box), image_size)
        return tf.image.grayscale_to_rgb(image) if channels == 1 else image
    return read_graph


def _box_reduce(image, k):
    """Pillow's ``Image.reduce(k)`` as :func:`read_resized` applies it (``k`` below 2 returns
    ``image``): the mean of each ``k x k`` block, partial blocks at the right and bottom edges
    included, in Pillow's fixed-point arithmetic (``(sum + n // 2) * m >> 24`` with
    ``m = float32(2**32) / float32(256 n)``), so the results agree to the last level.
    ``(H, W, C)`` uint8 -> ``(ceil(H/k), ceil(W/k), C)`` uint8; holds the image once more as
    int32 (4 bytes per value) while summing."""
    import tensorflow as tf

    def reduce():
        height, width, channels = tf.unstack(tf.shape(image))
        rows, cols = (height + k - 1) // k, (width + k - 1) // k
        padded = tf.pad(image, [[0, rows * k - height], [0, cols * k - width], [0, 0]])
        strips = tf.reduce_sum(tf.reshape(tf.cast(padded, tf.int32), [rows, k, cols * k, channels]), 1)
        sums = tf.reduce_sum(tf.reshape(tf.cast(strips, tf.int64), [rows, cols, k, channels]), 2)
        counts = (tf.minimum(k, height - k * tf.range(rows))[:, None]
                  * tf.minimum(k, width - k * tf.range(cols))[None, :])[:, :, None]
        multiplier = tf.cast(tf.constant(2.0**32) / tf.cast(256 * counts, tf.float32), tf.int64)
        counts = tf.cast(counts, tf.int64)
        return tf.cast(tf.bitwise.right_shift((sums + counts // 2) * multiplier, 24), tf.uint8)

    return tf.cond(k >= 2, reduce, lambda: image)


def _resize_as_read_resized(image, size: int):
    """``(H, W, C)`` uint8 -> ``(size, size, C)`` uint8 as :func:`read_resized` resizes with
    OpenCV: unchanged at the size, area averaging (``INTER_AREA``) when neither side grows,
    else bilinear with half-pixel centres (``INTER_LINEAR``). Rounded half to even, except a
    2 x 2 area reduction, which OpenCV rounds half up."""
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]

    def resized():
        shrinking = tf.logical_and(height >= size, width >= size)
        scaled = tf.cond(shrinking,
                         lambda: tf.image.resize(image, [size, size], method="area"),
                         lambda: tf.image.resize(image, [size, size], method="bilinear"))
        halves = tf.logical_and(tf.equal(height, 2 * size), tf.equal(width, 2 * size))
        rounded = tf.cond(halves, lambda: tf.floor(scaled + 0.5), lambda: tf.round(scaled))
        return tf.cast(tf.clip_by_value(rounded, 0, 255), tf.uint8)

    return tf.cond(tf.logical_and(tf.equal(height, size), tf.equal(width, size)),
                   lambda: image, resized)


def load_images(paths: list[str], image_size: int = 224) -> np.ndarray:
    """Decode a few images into one ``(n, size, size, 3)`` float32 array (0-255), for figures,
    Grad-CAM and counterfactual copies: decoded as :func:`image_dataset` decodes them, so a
    model given this array sees the pixels it sees in training and in ``predict_paths``."""
    batches = image_dataset(list(paths), image_size=image_size, batch_size=max(1, len(paths)), cache=False)
    images = [batch.numpy() for batch in batches]
    return np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)
