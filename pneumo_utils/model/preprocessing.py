"""Input normalisation that removes acquisition cues, as layers saved inside the model.

Why: on the Kermany training collection, NORMAL and PNEUMONIA images differ in their global
intensity distribution (NORMAL images have true-black backgrounds and darker borders: 1st
percentile 0.6 vs 7.6 grey levels, 99th 220 vs 200). A logistic regression on a handful of
such image statistics separates the classes with AUC 0.96 on a same-source hold-out, without
looking at a lung. A CNN can learn the same shortcut, and it fails where a new site's
exposure and post-processing differ. Histogram equalisation maps every image's grey levels
through its own cumulative histogram, so every image leaves with the same (flat) intensity
distribution: the shortcut is gone by construction, anatomy and opacities keep their
relative contrast. Cropping the outer frame removes border cues (collimation, markers).

Both run inside the saved model, so ``predict`` and ``evaluate`` apply them unchanged.
"""

from __future__ import annotations

import keras

GREY_LEVELS = 256
_DIGIT_BASE = 16  # GREY_LEVELS == _DIGIT_BASE ** 2


@keras.saving.register_keras_serializable(package="pneumo")
class HistogramEqualization(keras.layers.Layer):
    """Per-image global histogram equalisation of the grey levels; output is grey RGB.

    Input ``(batch, h, w, 3)`` in 0-255 (any float or integer dtype); output
    ``(batch, h, w, 3)`` float32 in 0-255 with the three channels equal. The grey level is
    the channel mean rounded to an integer; each pixel becomes ``255 * CDF(level)``, where
    CDF is the image's own cumulative histogram. Any monotone change of exposure, contrast
    or gamma applied to an image leaves the output unchanged (up to merged grey levels). No
    weights; not differentiable with respect to the input (nothing trains before it).

    Loading a model that contains it needs ``import pneumo_utils.model.preprocessing`` first (the layer is
    registered as ``pneumo>HistogramEqualization``).
    """

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        grey = keras.ops.clip(keras.ops.round(keras.ops.mean(x, axis=-1)), 0, GREY_LEVELS - 1)
        shape = keras.ops.shape(grey)
        levels = keras.ops.reshape(keras.ops.cast(grey, "int32"), (shape[0], -1))
        cdf = keras.ops.cumsum(_histogram(levels), axis=-1)
        cdf = cdf / keras.ops.maximum(cdf[:, -1:], 1.0)
        equalised = keras.ops.take_along_axis(cdf, levels, axis=-1) * (GREY_LEVELS - 1)
        equalised = keras.ops.reshape(equalised, shape)
        return keras.ops.repeat(keras.ops.expand_dims(equalised, -1), 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


def _histogram(levels):
    """Counts ``(batch, 256)`` float32 of the grey levels ``(batch, pixels)`` int32 in 0-255.

    Each level is split into two base-16 digits; the count of level ``16 * h + l`` is the
    number of pixels whose digits are ``h`` and ``l``, i.e. the product of two
    ``(pixels, 16)`` one-hot matrices. Made of comparisons and a matrix product, it converts
    to LiteRT's built-in ops and to ONNX (``bincount`` becomes ``DenseBincount``, which
    LiteRT runs only with the TensorFlow Select ops), and holds ``2 * 16`` floats per pixel
    rather than the 256 of a plain one-hot. Counts are exact (integers below 2**24).
    """
    digits = keras.ops.arange(_DIGIT_BASE, dtype="int32")

    def one_hot(digit):
        return keras.ops.cast(keras.ops.equal(keras.ops.expand_dims(digit, -1), digits), "float32")

    high, low = one_hot(levels // _DIGIT_BASE), one_hot(levels % _DIGIT_BASE)
    counts = keras.ops.einsum("bph,bpl->bhl", high, low)
    return keras.ops.reshape(counts, (keras.ops.shape(levels)[0], GREY_LEVELS))


def cue_removal(
    inputs, crop_fraction: float = 1.0, equalize: bool = True, name: str = "cue_removal"
):
    """Apply the cue-removing input layers to a functional-API tensor of 0-255 pixels.

    ``crop_fraction`` < 1 keeps the central share of each side (e.g. 0.8 drops 10% at every
    edge) and resizes back to the input size with Keras' own ``CenterCrop`` and
    ``Resizing`` layers; ``equalize`` adds :class:`HistogramEqualization`. Returns the
    transformed tensor (same shape), ready for the backbone's own scaling.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    height, width = int(inputs.shape[1]), int(inputs.shape[2])
    x = inputs
    if crop_fraction < 1.0:
        x = keras.layers.CenterCrop(
            round(height * crop_fraction), round(width * crop_fraction), name=f"{name}_crop"
        )(x)
        x = keras.layers.Resizing(height, width, name=f"{name}_resize")(x)
    if equalize:
        x = HistogramEqualization(name=f"{name}_equalize")(x)
    return x
