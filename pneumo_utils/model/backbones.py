"""Backbones, weights resolution and the classification head.

Every classifier here is built *flat* with the functional API: input -> preprocessing layer
-> backbone layers -> head. Flat models keep ``model.get_layer(last_conv).output`` connected
for Grad-CAM (a backbone nested as one layer breaks it) and take raw 0-255 RGB pixels, so the
preprocessing travels inside the saved ``.keras`` file. It is made of standard Keras layers
(``Rescaling``, or a fixed 1x1 ``Conv2D`` for the channel flip), so a saved model loads with
plain ``keras.models.load_model`` without importing this package. A binary task's model ends
in one sigmoid unit, P(second class); a three-class model in a softmax with one unit per class.
Saving and loading with the sidecar is :mod:`pneumo_utils.model.saving`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pneumo_utils.model.preprocessing import HistogramEqualization  # noqa: F401  (registers the layer for loading)

HEAD_PREFIX = "head_"


PREPROCESS_NAME = "preprocess"


_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """How to build one ImageNet backbone and where its weights live."""

    name: str
    constructor: str
    preprocessing: str
    weights_file: str
    weights_url: str
    last_conv: str


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "densenet121",
            "DenseNet121",
            "torch",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_WEIGHTS_URL + "densenet/",
            "relu",
        ),
        Backbone(
            "resnet50",
            "ResNet50",
            "caffe",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_WEIGHTS_URL + "resnet/",
            "conv5_block3_out",
        ),
        Backbone(
            "mobilenet_v2",
            "MobileNetV2",
            "tf",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            _KERAS_WEIGHTS_URL + "mobilenet_v2/",
            "out_relu",
        ),
    )
}


class WeightsNotFoundError(RuntimeError):
    """ImageNet weights could neither be found locally nor downloaded."""


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` called ``name`` (case-insensitive, ``-`` or ``_``)."""
    key = name.lower().replace("-", "_")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[key]


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])


_IMAGENET_STD = np.array([0.229, 0.224, 0.225])


_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


PREPROCESSING_MODES = ("tf", "torch", "caffe", "unit")


def preprocessing_layer(inputs, mode: str = "tf", name: str = PREPROCESS_NAME):
    """The backbone's own input scaling applied to ``inputs``, as one standard Keras layer.

    Input: ``(batch, h, w, 3)`` RGB in 0-255. Modes follow ``keras.applications``:
    ``tf`` scales to [-1, 1]; ``torch`` to [0, 1] then ImageNet mean/std (per-channel
    ``Rescaling``); ``caffe`` flips to BGR and subtracts the ImageNet mean (a frozen 1x1
    ``Conv2D`` whose kernel is the channel permutation and whose bias is minus the mean);
    ``unit`` scales to [0, 1] (models from scratch). The layer is never trainable.
    """
    if mode == "caffe":
        layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
        outputs = layer(inputs)
        layer.set_weights([np.eye(3)[::-1].reshape(1, 1, 3, 3), -_CAFFE_MEAN_BGR])
        return outputs
    scales = {
        "tf": (1 / 127.5, -1.0),
        "unit": (1 / 255.0, 0.0),
        "torch": ((1 / (255.0 * _IMAGENET_STD)).tolist(), (-_IMAGENET_MEAN / _IMAGENET_STD).tolist()),
    }
    if mode not in scales:
        raise ValueError(f"preprocessing mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
    scale, offset = scales[mode]
    return keras.layers.Rescaling(scale, offset, name=name)(inputs)


def resolve_weights(
    backbone: str, weights: str | os.PathLike | None = "imagenet", fallback: str = "error"
) -> str | None:
    """A local file with the backbone's ImageNet weights, or ``None`` for random init.

    ``weights`` may be ``"imagenet"``, ``None`` (or ``"none"``/``"random"``), or a path to an
    ``.h5``/``.weights.h5`` file. ``"imagenet"`` is looked up under Keras' canonical file name
    in the folders of :func:`pneumo_utils.data.fetch.weights_folders` (``PNEUMO_WEIGHTS_DIR``,
    the project's ``weights/``, ``../shared/weights/``, the Keras cache), as data sets are found,
    and only then downloaded. When that fails, ``fallback="error"`` raises
    :class:`WeightsNotFoundError` naming the folders searched and how to fix it, and
    ``fallback="random"`` warns and returns ``None``.
    """
    from pneumo_utils.data.fetch import weights_folders

    spec = get_backbone(backbone)
    if weights is None or str(weights).lower() in ("none", "null", "random", ""):
        return None
    if str(weights).lower() != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        return str(path)
    folders = weights_folders()
    for folder in folders:
        candidate = folder / spec.weights_file
        if candidate.is_file():
            return str(candidate)
    try:
        return keras.utils.get_file(
            spec.weights_file, spec.weights_url + spec.weights_file, cache_subdir="models"
        )
    except Exception as exc:  # network errors come in many types; all mean "not available"
        message = (
            f"ImageNet weights for {spec.name} are not available offline and could not be "
            f"downloaded ({type(exc).__name__}); {spec.weights_file} is in none of "
            f"{', '.join(str(f) for f in folders)}. Put it in one of them (or set "
            f"PNEUMO_WEIGHTS_DIR to its folder), pass weights=PATH, or use weights=None to train "
            f"from a random initialisation."
        )
        if fallback == "random":
            warnings.warn(message + " Continuing with RANDOM weights.", stacklevel=2)
            return None
        raise WeightsNotFoundError(message) from None


def build_classifier(
    backbone: str = "densenet121",
    image_size: int = 224,
    weights: str | None = None,
    dense_units: int = 128,
    dropout: float = 0.5,
    l2: float = 0.0,
    freeze_base: bool = True,
    seed: int | None = None,
    remove_cues: bool = False,
    n_classes: int = 2,
) -> keras.Model:
    """A flat transfer-learning classifier: preprocessing, backbone, GAP, dense head, output.

    The notebooks write this model out layer by layer; tests and benchmarks build it here.
    ``weights`` is a resolved file path or ``None`` (see :func:`resolve_weights`), loaded by
    layer name. ``remove_cues`` puts :func:`pneumo_utils.model.preprocessing.cue_removal` (centre
    crop 0.8, histogram equalisation) in front of the backbone's own scaling. The head is
    GlobalAveragePooling -> Dense(``dense_units``, relu, optional L2) -> Dropout(``dropout``)
    -> the output layer of :func:`_attach_head`: ``(batch, 1)`` probability of the positive
    class for ``n_classes=2``, ``(batch, n_classes)`` softmax probabilities for more. Input
    ``(batch, image_size, image_size, 3)`` RGB in 0-255.
    """
    from pneumo_utils.model.preprocessing import cue_removal

    spec = get_backbone(backbone)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = cue_removal(inputs, crop_fraction=0.8) if remove_cues else inputs
    x = preprocessing_layer(x, spec.preprocessing)
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_tensor=x
    )
    if weights is not None:
        base.load_weights(weights, by_name=True)
    model = _attach_head(inputs, base.output, spec.name, dense_units, dropout, l2, n_classes)
    for layer in base_layers(model):
        layer.trainable = not freeze_base
    return model


def build_scratch_cnn(
    image_size: int = 128,
    filters: tuple[int, ...] = (32, 64, 128, 256),
    dense_units: int = 128,
    dropout: float = 0.5,
    conv_dropout: float = 0.2,
    l2: float = 0.0,
    seed: int | None = None,
    n_classes: int = 2,
) -> keras.Model:
    """A small CNN trained from scratch: per block Conv2D-BatchNorm-ReLU x2, MaxPool, Dropout.

    Same input contract and head (``n_classes`` included) as :func:`build_classifier`, so
    training, Grad-CAM (its last conv block is found automatically) and evaluation treat
    both alike.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing_layer(inputs, "unit")
    for block, n in enumerate(filters, start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(
                n, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}"
            )(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        if block < len(filters):
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
            x = keras.layers.Dropout(conv_dropout, name=f"block{block}_dropout")(x)
    return _attach_head(inputs, x, "scratch_cnn", dense_units, dropout, l2, n_classes)


def _attach_head(
    inputs, features, name: str, dense_units: int, dropout: float, l2: float, n_classes: int = 2
):
    """GAP -> Dense(relu, optional L2) -> Dropout -> output, named ``head_*``.

    The output is Dense(1, sigmoid), P(second class), for two classes (a binary task decides
    with a threshold on it), and Dense(``n_classes``, softmax) for three or more.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be 2 or more, got {n_classes!r}")
    regularizer = keras.regularizers.L2(l2) if l2 else None
    x = keras.layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "gap")(features)
    x = keras.layers.Dense(
        dense_units, activation="relu", kernel_regularizer=regularizer, name=HEAD_PREFIX + "dense"
    )(x)
    x = keras.layers.Dropout(dropout, name=HEAD_PREFIX + "dropout")(x)
    units, activation = (1, "sigmoid") if n_classes == 2 else (n_classes, "softmax")
    x = keras.layers.Dense(units, activation=activation, name=HEAD_PREFIX + "output")(x)
    return keras.Model(inputs, x, name=name)


def head_on_features(model: keras.Model) -> keras.Model:
    """The model's own head layers (shared weights) as a model on pooled features.

    Input ``(batch, channels)`` as returned by :func:`pooled_features_model`. Training it
    trains the full model's head in place, so the full model (base + trained head) is ready
    for saving, Grad-CAM and prediction right after training on cached features.
    """
    gap = model.get_layer(HEAD_PREFIX + "gap")
    inputs = keras.Input((int(gap.output.shape[-1]),), name="features")
    x = inputs
    for name in ("dense", "dropout", "output"):
        x = model.get_layer(HEAD_PREFIX + name)(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def pooled_features_model(model: keras.Model) -> keras.Model:
    """The model up to the global-average-pooled backbone features ``(batch, channels)``."""
    return keras.Model(model.inputs, model.get_layer(HEAD_PREFIX + "gap").output)


def base_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers in order (everything between preprocessing and the head)."""
    return [
        layer
        for layer in model.layers
        if not layer.name.startswith(HEAD_PREFIX)
        and layer.name != PREPROCESS_NAME
        and not isinstance(layer, keras.layers.InputLayer)
    ]
