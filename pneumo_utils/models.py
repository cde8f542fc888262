"""Backbones, weights resolution, the classification head, and the saved-model contract.

Every classifier here is built *flat* with the functional API: input -> preprocessing layer
-> backbone layers -> head. Flat models keep ``model.get_layer(last_conv).output`` connected
for Grad-CAM (a backbone nested as one layer breaks it) and take raw 0-255 RGB pixels, so the
preprocessing travels inside the saved ``.keras`` file.

A trained model travels as ``NAME.keras`` plus a JSON sidecar ``NAME.json`` holding the
backbone, image size, class names, decision threshold and how it was chosen, and the data and
metrics summary. :func:`load_model` returns both; prediction and evaluation need nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pneumo_utils import CLASS_NAMES, __version__
from pneumo_utils.data import image_dataset

HEAD_PREFIX = "head_"
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


class ModelFileError(ValueError):
    """A file is not a pneumo/Keras model, or does not fit the data it is given."""


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` called ``name`` (case-insensitive, ``-`` or ``_``)."""
    key = name.lower().replace("-", "_")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[key]


@keras.saving.register_keras_serializable(package="pneumo")
class Preprocess(keras.layers.Layer):
    """The backbone's own input scaling, as a layer so it is saved with the model.

    Input: ``(batch, h, w, 3)`` RGB in 0-255. Modes follow ``keras.applications``:
    ``tf`` scales to [-1, 1]; ``torch`` to [0, 1] then ImageNet mean/std; ``caffe`` flips to
    BGR and subtracts the ImageNet mean; ``unit`` scales to [0, 1] (models from scratch).
    """

    MODES = ("tf", "torch", "caffe", "unit")

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"preprocessing mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = np.array([0.485, 0.456, 0.406], "float32")
            std = np.array([0.229, 0.224, 0.225], "float32")
            return (x / 255.0 - mean) / std
        return keras.ops.flip(x, axis=-1) - np.array([103.939, 116.779, 123.68], "float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def resolve_weights(
    backbone: str, weights: str | os.PathLike | None = "imagenet", fallback: str = "error"
) -> str | None:
    """A local file with the backbone's ImageNet weights, or ``None`` for random init.

    ``weights`` may be ``"imagenet"``, ``None`` (or ``"none"``/``"random"``), or a path to an
    ``.h5``/``.weights.h5`` file. ``"imagenet"`` is looked up, in order, in the folder named by
    the ``PNEUMO_WEIGHTS_DIR`` environment variable and in the Keras cache
    (``~/.keras/models``) under Keras' canonical file name, and only then downloaded. When that
    fails, ``fallback="error"`` raises :class:`WeightsNotFoundError` saying how to fix it and
    ``fallback="random"`` warns and returns ``None``.
    """
    spec = get_backbone(backbone)
    if weights is None or str(weights).lower() in ("none", "null", "random", ""):
        return None
    if str(weights).lower() != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        return str(path)
    folders = [os.environ.get("PNEUMO_WEIGHTS_DIR"), Path.home() / ".keras" / "models"]
    for folder in filter(None, folders):
        candidate = Path(folder).expanduser() / spec.weights_file
        if candidate.is_file():
            return str(candidate)
    try:
        return keras.utils.get_file(
            spec.weights_file, spec.weights_url + spec.weights_file, cache_subdir="models"
        )
    except Exception as exc:  # network errors come in many types; all mean "not available"
        message = (
            f"ImageNet weights for {spec.name} are not available offline and could not be "
            f"downloaded ({type(exc).__name__}). Put {spec.weights_file} in a folder and set "
            f"PNEUMO_WEIGHTS_DIR to it, pass weights=PATH, or use weights=None to train from a "
            f"random initialisation."
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
) -> keras.Model:
    """A flat transfer-learning classifier: preprocessing, backbone, GAP, dense head, sigmoid.

    ``weights`` is a resolved file path or ``None`` (see :func:`resolve_weights`). The head is
    the seeds': GlobalAveragePooling -> Dense(``dense_units``, relu, optional L2) ->
    Dropout(``dropout``) -> Dense(1, sigmoid). Input ``(batch, image_size, image_size, 3)``
    RGB in 0-255; output ``(batch, 1)`` probability of PNEUMONIA.
    """
    spec = get_backbone(backbone)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_tensor=x
    )
    if weights is not None:
        base.load_weights(weights)
    model = _attach_head(inputs, base.output, spec.name, dense_units, dropout, l2)
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
) -> keras.Model:
    """A small CNN trained from scratch: per block Conv2D-BatchNorm-ReLU x2, MaxPool, Dropout.

    Same input contract and head as :func:`build_classifier`, so training, Grad-CAM (its
    last conv block is found automatically) and evaluation treat both alike.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = Preprocess("unit", name="preprocess")(inputs)
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
    return _attach_head(inputs, x, "scratch_cnn", dense_units, dropout, l2)


def _attach_head(inputs, features, name: str, dense_units: int, dropout: float, l2: float):
    """GAP -> Dense(relu, optional L2) -> Dropout -> Dense(1, sigmoid), named ``head_*``."""
    regularizer = keras.regularizers.L2(l2) if l2 else None
    x = keras.layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "gap")(features)
    x = keras.layers.Dense(
        dense_units, activation="relu", kernel_regularizer=regularizer, name=HEAD_PREFIX + "dense"
    )(x)
    x = keras.layers.Dropout(dropout, name=HEAD_PREFIX + "dropout")(x)
    x = keras.layers.Dense(1, activation="sigmoid", name=HEAD_PREFIX + "output")(x)
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
        and not isinstance(layer, (keras.layers.InputLayer, Preprocess))
    ]


def unfreeze_top(model: keras.Model, n_layers: int, train_batchnorm: bool = False) -> int:
    """Make the last ``n_layers`` backbone layers trainable, the rest frozen.

    BatchNormalization layers stay frozen (so they run in inference mode and keep their
    ImageNet statistics, the standard recipe for fine-tuning on a small data set) unless
    ``train_batchnorm``. Returns the number of trainable backbone layers. Recompile after.
    """
    layers = base_layers(model)
    cut = max(0, len(layers) - n_layers)
    trainable = 0
    for i, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= cut and (train_batchnorm or not is_bn)
        trainable += layer.trainable
    return trainable


def model_metadata(model: keras.Model, **info: Any) -> dict:
    """Sidecar metadata for a model: what it is, how to feed it, and how to read its output."""
    meta = {
        "name": model.name,
        "image_size": int(model.inputs[0].shape[1]),
        "input": "RGB pixels in 0-255; preprocessing is inside the model",
        "class_names": list(CLASS_NAMES),
        "threshold": 0.5,
        "threshold_rule": "default 0.5",
        "pneumo_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": "research and teaching only; not for diagnostic use",
    }
    meta.update(info)
    return meta


def predict_paths(model: keras.Model, paths: list[str], batch_size: int = 32) -> np.ndarray:
    """PNEUMONIA probabilities ``(n,)`` for image files, decoded in parallel and batched."""
    size = int(model.inputs[0].shape[1])
    dataset = image_dataset(paths, image_size=size, batch_size=batch_size, cache=False)
    return model.predict(dataset, verbose=0).reshape(-1)


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON sidecar that travels with ``model_path`` (same stem, ``.json``)."""
    return Path(model_path).with_suffix(".json")


def save_model(model: keras.Model, path: str | Path, metadata: dict | None = None) -> Path:
    """Save ``model`` and its sidecar atomically (temporary file, then rename).

    An interrupted run never leaves a half-written model under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata if metadata is not None else model_metadata(model)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        model.save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json_atomic(sidecar_path(path), meta)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write: no half-written temporary file


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def load_model(path: str | Path) -> tuple[keras.Model, dict]:
    """Load a saved model (Keras safe mode, never unpickling) and its sidecar metadata.

    Raises :class:`ModelFileError` naming the file when it is not a ``.keras`` model, when
    Keras safe mode refuses it (a ``Lambda`` layer or other Python code inside), when the
    model does not take one square RGB image ``(h, w, 3)``, or when the sidecar's
    ``image_size`` disagrees with the model's input. Without a sidecar, metadata is inferred
    from the model (threshold 0.5).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a Keras .keras model file (expected a zip archive saved by "
            "model.save('NAME.keras'))"
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "unsafe" in text.lower():
            raise ModelFileError(
                f"refusing to load {path}: it contains Python code (e.g. a Lambda layer) that "
                "Keras safe mode will not deserialize, and pneumo never loads models unsafely; "
                "rebuild the model without Lambda layers and save it again "
                f"(Keras: {text.split('. ')[0]})"
            ) from None
        raise ModelFileError(f"cannot load {path} as a Keras model: {text}") from None
    meta_file = sidecar_path(path)
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"sidecar {meta_file} is not valid JSON: {exc}") from None
    size = _square_rgb_input_size(model, path)
    if "image_size" in meta and size is not None and int(meta["image_size"]) != size:
        raise ModelFileError(
            f"sidecar {meta_file} says image_size {meta['image_size']} but {path} takes "
            f"{size}x{size} input: the sidecar belongs to another model or was edited"
        )
    if size is None and "image_size" not in meta:
        raise ModelFileError(
            f"{path} accepts any image size and has no sidecar {meta_file} giving image_size"
        )
    if not meta:
        meta = model_metadata(model)
    meta.setdefault("image_size", size)
    return model, meta


def _square_rgb_input_size(model: keras.Model, path: Path) -> int | None:
    """The side ``n`` of a model taking ``(batch, n, n, 3)`` (``None`` if not fixed), else
    :class:`ModelFileError`: pneumo models take one square RGB image per example."""
    shapes = [tuple(t.shape) for t in model.inputs]
    if len(shapes) == 1 and len(shapes[0]) == 4:
        _, h, w, channels = shapes[0]
        if channels == 3 and h == w:
            return None if h is None else int(h)
    shown = ", ".join(str(s) for s in shapes) or "none"
    raise ModelFileError(
        f"{path} expects (h, w, 3) RGB input with h == w (one square RGB image, as the "
        f"pneumo builders make), but its input shape is {shown}"
    )
