"""Data augmentation for chest X-rays with Keras preprocessing layers, in the tf.data pipeline.

Augmentation shows the network slightly different versions of each training image every
epoch (a few degrees of rotation, a little zoom and shift, a little brighter or darker, a
little more or less contrast), the variation between real radiographs from different
patients, positions and exposures. That discourages memorising individual images, which
matters when the backbone is being fine-tuned on a few thousand pictures.

The transforms are kept **small** on purpose: a chest X-ray is taken in a standard
position, so large rotations or zooms produce images the model will never see at
prediction time.

**Horizontal flip is off by default.** Chest X-rays are not left-right symmetric: the heart
lies mostly on the left, the aortic knob is on the left, the liver and the higher right
hemidiaphragm on the right, and the hospital's side marker ("L"/"R") is printed on one side.
A flipped image shows situs inversus, an anatomy almost no patient has, so flipping teaches
the model about impossible images (and can blur real left-right cues). It is available with
``horizontal_flip=True`` for experiments.

Augmentation runs in the input pipeline (``Dataset.map`` in parallel, then prefetch), not as
layers inside the model: the saved ``.keras`` model stays a plain classifier, and Grad-CAM,
prediction and the feature cache never see random transforms. Only training batches are
augmented; validation and test images never are.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from pneumo_utils.data.pipelines import image_dataset

DEFAULTS = {"rotation": 7.0, "zoom": 0.1, "shift": 0.05, "brightness": 0.1, "contrast": 0.1}
"""Modest defaults: +-7 degrees, +-10% zoom, +-5% shift, +-10% brightness and contrast."""


def augmentation(
    rotation: float = DEFAULTS["rotation"],
    zoom: float = DEFAULTS["zoom"],
    shift: float = DEFAULTS["shift"],
    brightness: float = DEFAULTS["brightness"],
    contrast: float = DEFAULTS["contrast"],
    horizontal_flip: bool = False,
    stretch: float = 0.0,
    seed: int = 0,
) -> keras.Sequential:
    """A ``keras.Sequential`` of random preprocessing layers for RGB X-rays in 0-255.

    Parameters
    ----------
    rotation : largest rotation in **degrees**, either way (``RandomRotation``).
    zoom : largest zoom in or out as a fraction of the image size (``RandomZoom``).
    shift : largest shift as a fraction of height and width (``RandomTranslation``).
    brightness : largest brightness change as a fraction of the 0-255 range
        (``RandomBrightness``).
    contrast : largest contrast change, e.g. ``0.1`` scales contrast by 0.9-1.1
        (``RandomContrast``).
    horizontal_flip : add ``RandomFlip("horizontal")``; off by default because chest X-rays
        are not left-right symmetric (see the module docstring).
    stretch : largest horizontal stretch or squeeze as a fraction of the width
        (``RandomZoom`` on the width only). On data sets whose originals differ in aspect
        ratio by class, as Kermany's do (NORMAL images are wider), a square resize turns the
        aspect ratio into a difference of shape; random stretching makes shape useless as a
        label. Off by default.
    seed : seeds the layers (each gets its own seed derived from it). With
        :func:`pneumo_utils.data.pipelines.set_seed` (TensorFlow op determinism, as in the notebooks)
        a seeded run draws the same transforms; without it the parallel map may hand the
        random draws to batches in a different order.

    A value of 0 leaves that layer out; with everything 0/False the model has no layers and
    :func:`augment_dataset` passes batches through unchanged. Geometric transforms fill the
    uncovered border with black (``fill_mode="constant"``), as outside a radiograph's
    collimated field, rather than mirroring anatomy into it.
    """
    for name, value in (("rotation", rotation), ("zoom", zoom), ("shift", shift),
                        ("brightness", brightness), ("contrast", contrast), ("stretch", stretch)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if rotation > 180:
        raise ValueError(f"rotation is in degrees and must be <= 180, got {rotation}")
    if zoom >= 1 or shift >= 1 or brightness >= 1 or contrast >= 1 or stretch >= 1:
        raise ValueError("zoom, shift, brightness, contrast and stretch are fractions below 1")
    geometry = {"fill_mode": "constant", "fill_value": 0.0}
    layers = []
    if horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="flip"))
    if rotation:
        layers.append(
            keras.layers.RandomRotation(rotation / 360.0, seed=seed + 1, name="rotation", **geometry)
        )
    if stretch:
        layers.append(keras.layers.RandomZoom((0.0, 0.0), (-stretch, stretch), seed=seed + 6,
                                              name="stretch", **geometry))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, zoom, seed=seed + 2, name="zoom", **geometry))
    if shift:
        layers.append(
            keras.layers.RandomTranslation(shift, shift, seed=seed + 3, name="shift", **geometry)
        )
    if brightness:
        layers.append(keras.layers.RandomBrightness(brightness, seed=seed + 4, name="brightness"))
    if contrast:
        # A pair, not a scalar: Keras reads a scalar contrast factor f as a range of 1 to
        # 1 + f (more contrast only); (f, f) gives the symmetric 1 - f to 1 + f.
        layers.append(
            keras.layers.RandomContrast((contrast, contrast), seed=seed + 5, name="contrast")
        )
    return keras.Sequential(layers, name="augmentation")


def describe(layers: keras.Sequential | None) -> str:
    """One line naming the augmentation layers and their ranges, for reports."""
    if layers is None or not layers.layers:
        return "no augmentation"
    parts = []
    for layer in layers.layers:
        config = layer.get_config()
        if layer.name == "flip":
            parts.append(f"{config['mode']} flip")
            continue
        key = "factor" if "factor" in config else "width_factor" if layer.name == "stretch" else "height_factor"
        value = _largest(config[key])
        parts.append(f"{layer.name} +-{value * 360:.0f} deg" if layer.name == "rotation"
                     else f"{layer.name} +-{value:.0%}")
    return ", ".join(parts)


def _largest(value) -> float:
    """The largest magnitude of a scalar or a (lower, upper) pair from a layer config."""
    return float(np.max(np.abs(np.asarray(value, dtype=float))))


def augment_dataset(dataset, layers: keras.Sequential | None):
    """Apply ``layers`` (``training=True``) to the images of a batched tf.data dataset.

    ``dataset`` yields image batches ``(b, h, w, 3)`` in 0-255, optionally paired with
    labels (and sample weights); the extra elements pass through. The map runs in
    parallel and the result is prefetched, so augmentation overlaps with training. With
    ``layers`` ``None`` or empty the dataset is returned as it is.
    """
    import tensorflow as tf

    if layers is None or not layers.layers:
        return dataset

    def apply(images, *rest):
        for layer in layers.layers:
            images = layer(images, training=True)
        return (images, *rest) if rest else images

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def training_dataset(
    paths: list[str],
    labels: np.ndarray,
    image_size: int,
    batch_size: int = 32,
    layers: keras.Sequential | None = None,
    seed: int = 0,
    images_per_epoch: int | None = None,
):
    """The training input pipeline: decode (cached in memory), shuffle, batch, augment, prefetch.

    With ``images_per_epoch`` the shuffled data repeat endlessly and an "epoch" is
    ``ceil(images_per_epoch / batch_size)`` steps, a fresh random share of the training
    set each time (useful when a full pass over the images is too slow, as when
    fine-tuning on a CPU). Returns ``(dataset, steps_per_epoch)``, ``steps_per_epoch``
    being ``None`` for full passes; pass it to ``model.fit(steps_per_epoch=...)``.
    """
    if images_per_epoch is not None and images_per_epoch < 1:
        raise ValueError(f"images_per_epoch must be >= 1, got {images_per_epoch}")
    partial = images_per_epoch is not None and images_per_epoch < len(paths)
    # An in-memory cache is kept only once a pass has read every image; with partial
    # epochs that may never happen, and decoding a JPEG costs about a millisecond anyway.
    dataset = image_dataset(paths, labels, image_size, batch_size, shuffle=True, seed=seed,
                            cache=not partial)
    steps = None
    if partial:
        dataset = dataset.repeat()
        steps = math.ceil(images_per_epoch / batch_size)
    return augment_dataset(dataset, layers), steps


def preview(layers: keras.Sequential | None, image: np.ndarray, n: int = 8) -> np.ndarray:
    """``n`` augmented versions of one image ``(h, w, 3)`` in 0-255; the first is the original.

    For a figure (``plots.sample_grid``) showing what the network sees during training.
    """
    image = np.asarray(image, dtype=np.float32)
    batch = np.repeat(image[None], max(n - 1, 0), axis=0)
    if layers is not None and layers.layers and len(batch):
        for layer in layers.layers:
            batch = layer(batch, training=True)
        batch = keras.ops.convert_to_numpy(batch)
    return np.concatenate([image[None], np.asarray(batch, dtype=np.float32)])[:n]
