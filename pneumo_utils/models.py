"""Backbones, weights resolution, the classification head, and the saved-model contract.

Every classifier here is built *flat* with the functional API: input -> preprocessing layer
-> backbone layers -> head. Flat models keep ``model.get_layer(last_conv).output`` connected
for Grad-CAM (a backbone nested as one layer breaks it) and take raw 0-255 RGB pixels, so the
preprocessing travels inside the saved ``.keras`` file. It is made of standard Keras layers
(``Rescaling``, or a fixed 1x1 ``Conv2D`` for the channel flip), so a saved model loads with
plain ``keras.models.load_model`` without importing this package.

A trained model travels as ``NAME.keras`` plus a JSON sidecar ``NAME.json`` holding the
backbone, image size, task and class names, output and decision (a threshold and how it was
chosen, or argmax), and the data and metrics summary. A binary task's model ends in one
sigmoid unit, P(second class); a three-class model in a softmax with one unit per class.
:func:`load_model` returns both; prediction and evaluation need nothing else.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
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
from pneumo_utils.io import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    TASK_CLASS_NAMES,
    ModelFileError,
    check_fingerprint,
    check_output,
    current_umask,
    file_digest,
    read_sidecar,
    validate_metadata,
    write_json_atomic,
)
from pneumo_utils.preprocessing import HistogramEqualization  # noqa: F401  (registers the layer for loading)

HEAD_PREFIX = "head_"
PREPROCESS_NAME = "preprocess"
MAX_MODEL_BYTES = 2**31
"""Largest total uncompressed size of a ``.keras`` archive that :func:`load_model` opens
(a ResNet50 classifier is about 100 MB)."""
MAX_CONFIG_BYTES = 64 * 2**20
"""Largest uncompressed JSON member (``config.json``, ``metadata.json``) of a ``.keras``
archive; a DenseNet121 config is under 1 MB."""
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
    remove_cues: bool = False,
    n_classes: int = 2,
) -> keras.Model:
    """A flat transfer-learning classifier: preprocessing, backbone, GAP, dense head, output.

    The notebooks write this model out layer by layer; tests and benchmarks build it here.
    ``weights`` is a resolved file path or ``None`` (see :func:`resolve_weights`), loaded by
    layer name. ``remove_cues`` puts :func:`pneumo_utils.preprocessing.cue_removal` (centre
    crop 0.8, histogram equalisation) in front of the backbone's own scaling. The head is
    GlobalAveragePooling -> Dense(``dense_units``, relu, optional L2) -> Dropout(``dropout``)
    -> the output layer of :func:`_attach_head`: ``(batch, 1)`` probability of the positive
    class for ``n_classes=2``, ``(batch, n_classes)`` softmax probabilities for more. Input
    ``(batch, image_size, image_size, 3)`` RGB in 0-255.
    """
    from pneumo_utils.preprocessing import cue_removal

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


def model_metadata(model: keras.Model, task: str | None = None, **info: Any) -> dict:
    """Sidecar metadata for a model: what it is, how to feed it, and how to read its output.

    ``task`` (a name in :data:`pneumo_utils.tasks.TASKS`) sets ``class_names``. Without it
    the task is the one whose class names ``info`` gives; with no class names, ``pneumonia``
    for a sigmoid model and the task with as many classes for a softmax one; other class
    names (an NIH finding) write no task. ``output`` and ``decision`` come from the model's
    last layer: a sigmoid model decides with ``threshold`` (default 0.5), a softmax model by
    argmax and has no threshold (``threshold=None``, as a multi-class evaluation gives, writes
    none). Raises :class:`~pneumo_utils.io.ModelFileError` when the model's output does not
    fit the task.
    """
    output, units = output_kind(model)
    if task is None:
        given = tuple(info.get("class_names") or ())
        if given:
            task = next((t for t, names in TASK_CLASS_NAMES.items() if names == given), None)
        elif output == "sigmoid":
            task = "pneumonia"
        else:
            task = next((t for t, names in TASK_CLASS_NAMES.items() if len(names) == units), None)
    meta: dict[str, Any] = {
        "name": model.name,
        "image_size": int(model.inputs[0].shape[1]),
        "input": "RGB pixels in 0-255; preprocessing is inside the model",
    }
    if task is not None:
        meta["task"] = task
    meta["class_names"] = list(TASK_CLASS_NAMES[task]) if task is not None else list(CLASS_NAMES)
    meta["output"] = output
    if output == "sigmoid":
        meta.update(decision="threshold", threshold=0.5, threshold_rule="default 0.5")
    else:
        meta["decision"] = "argmax"
    meta.update(
        pneumo_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        intended_use="research and teaching only; not for diagnostic use",
    )
    custom = sorted({f"pneumo>{type(layer).__name__}" for layer in model.layers
                     if type(layer).__module__.startswith("pneumo_utils")})
    if custom:
        meta["custom_layers"] = custom
    meta.update(info)
    if output == "softmax" and "threshold" in meta and meta["threshold"] is None:
        del meta["threshold"]
    validate_metadata(meta, f"metadata of model {model.name}")
    check_output(meta, units, f"model {model.name}", "its metadata")
    return meta


def output_kind(model: keras.Model, path: str | Path | None = None) -> tuple[str, int]:
    """``("sigmoid", 1)`` or ``("softmax", K)``: the model's one output layer and its width.

    Raises :class:`~pneumo_utils.io.ModelFileError` (naming ``path``, or the model) for any
    other output: several outputs, another activation, a two-unit softmax (whose first
    column would be read as P(positive)).
    """
    outputs = model.outputs
    shape = tuple(outputs[0].shape) if len(outputs) == 1 else None
    layer = getattr(outputs[0], "_keras_history", [None])[0] if outputs else None
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    from pneumo_utils.ensemble import members_of

    members = members_of(model) if isinstance(layer, keras.layers.Average) else []
    if members:  # an ensemble's mean of probabilities is what its members output
        kinds = {output_kind(member, path) for member in members}
        if len(kinds) == 1:
            return kinds.pop()
    if shape is not None and len(shape) == 2:
        if shape[-1] == 1 and activation == "sigmoid":
            return "sigmoid", 1
        if shape[-1] is not None and shape[-1] >= 3 and activation == "softmax":
            return "softmax", int(shape[-1])
    shown = ", ".join(str(tuple(t.shape)) for t in outputs)
    raise ModelFileError(
        f"{path or 'model ' + model.name} must end in one sigmoid unit giving P(positive) per "
        f"image (a binary task) or a softmax over 3 or more classes (three_class), as the "
        f"pneumo builders make, but its output is {shown} from activation "
        f"{activation or 'unknown'}; any other output would be misread"
    )


def predict_paths(
    model: keras.Model, paths: list[str], batch_size: int = 32, verbose: bool = False
) -> np.ndarray:
    """Probabilities for image files, decoded in parallel and batched: ``(n,)`` P(positive
    class) for a one-unit sigmoid model, ``(n, K)`` for a ``K``-class softmax.

    ``verbose`` shows a progress bar over the batches on a terminal (:class:`ProgressBar`)
    and prints one closing line.
    """
    size = int(model.inputs[0].shape[1])
    dataset = image_dataset(paths, image_size=size, batch_size=batch_size, cache=False)
    callbacks = [ProgressBar(math.ceil(len(paths) / batch_size), "predict")] if verbose else []
    start = time.perf_counter()
    proba = model.predict(dataset, verbose=0, callbacks=callbacks)
    if verbose:
        print(f"predict: {len(paths)} images in {time.perf_counter() - start:.0f} s")
    return proba.reshape(-1) if proba.shape[-1] == 1 else proba


class ProgressBar(keras.callbacks.Callback):
    """A ``tqdm`` bar over the batches of ``model.predict`` (``total`` batches), drawn only
    when stderr is a terminal.

    In a Jupyter kernel (papermill included), a pipe or a log file every redraw of a text
    bar stays behind as a line (one per batch in a notebook's HTML report), so there the
    bar is off (``tqdm``'s ``disable=None``) and the caller prints one closing line.
    """

    def __init__(self, total: int, description: str) -> None:
        super().__init__()
        self.total, self.description, self.bar = total, description, None

    def on_predict_begin(self, logs=None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.description, unit="batch", leave=False,
                        disable=None)

    def on_predict_batch_end(self, batch, logs=None) -> None:
        self.bar.update(1)

    def on_predict_end(self, logs=None) -> None:
        self.bar.close()


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON sidecar that travels with ``model_path`` (same stem, ``.json``)."""
    return Path(model_path).with_suffix(".json")


def save_model(model: keras.Model, path: str | Path, metadata: dict | None = None) -> Path:
    """Save ``model`` and its sidecar atomically (temporary file, then rename).

    An interrupted run never leaves a half-written model under ``path``; the temporary file
    of a save that was killed (its name carries the process id) is removed by the next save
    into the same folder. The sidecar records the SHA-256 of the ``.keras`` file it was
    written with (``sha256``: ``{"keras": ...}``, replacing any digests in ``metadata``, whose
    exports describe other weights), so :func:`load_model` refuses it beside another model;
    rewriting only the sidecar later keeps it valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    meta = metadata if metadata is not None else model_metadata(model)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=path.parent, prefix=f".{path.stem}.{os.getpid()}.")
    os.close(fd)
    try:
        model.save(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual permissions
        digest = file_digest(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json_atomic(sidecar_path(path), {**meta, "sha256": {"keras": digest}})
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.STEM.PID.*.keras`` files in ``path``'s folder whose process is gone."""
    import psutil

    pattern = re.compile(rf"^\.{re.escape(path.stem)}\.(\d+)\..*\.keras$")
    for candidate in path.parent.glob(f".{path.stem}.*.keras"):
        match = pattern.match(candidate.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def load_model(path: str | Path) -> tuple[keras.Model, dict]:
    """Load a saved model (Keras safe mode, never unpickling) and its sidecar metadata.

    Raises :class:`ModelFileError` naming the file when it is not a ``.keras`` model, when
    its archive would unpack to more than :data:`MAX_MODEL_BYTES` (or a JSON member to more
    than :data:`MAX_CONFIG_BYTES`), when Keras safe mode refuses it (Python code inside),
    when the model does not take one square RGB image ``(h, w, 3)`` or does not end in one
    sigmoid unit or a softmax over 3 or more classes (:func:`output_kind`), when the
    sidecar fails :func:`~pneumo_utils.io.validate_metadata`, when its ``image_size``
    disagrees with the model's input, or when its task does not fit the output
    (:func:`~pneumo_utils.io.check_output`: a sigmoid model with a three-class sidecar, a
    softmax model whose sidecar names no multi-class task or is missing, a softmax of the
    wrong width), or when it records the SHA-256 of another ``.keras`` file
    (:func:`~pneumo_utils.io.check_fingerprint`). Without a sidecar, the metadata of a
    sigmoid model is inferred from the model (task pneumonia, threshold 0.5).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a Keras .keras model file (expected a zip archive saved by "
            "model.save('NAME.keras'))"
        )
    _check_archive_sizes(path)
    meta_file = sidecar_path(path)
    meta = read_sidecar(meta_file)
    check_fingerprint(meta, path, f"sidecar {meta_file}")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "unsafe" in text.lower():
            raise ModelFileError(
                f"refusing to load {path}: Keras safe mode found Python code inside it "
                f"({text.split('. ')[0]}); pneumo never loads models unsafely, so rebuild the "
                "model from standard layers and save it again"
            ) from None
        raise ModelFileError(f"cannot load {path} as a Keras model: {text}") from None
    size = _square_rgb_input_size(model, path)
    _, units = output_kind(model, path)
    check_output(meta, units, path, f"sidecar {meta_file}")
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


def _check_archive_sizes(path: Path) -> None:
    """Refuse a ``.keras`` archive whose members would unpack to more memory than any pneumo
    model needs (a small file can declare a 1 GiB ``config.json``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"cannot read {path} as a zip archive: {exc}") from None
    total = sum(m.file_size for m in members)
    big_json = [m for m in members if m.filename.endswith(".json") and m.file_size > MAX_CONFIG_BYTES]
    if big_json or total > MAX_MODEL_BYTES:
        what = (f"{big_json[0].filename} unpacks to {big_json[0].file_size / 2**20:,.0f} MiB "
                f"(limit {MAX_CONFIG_BYTES / 2**20:.0f} MiB)") if big_json else (
                f"its members unpack to {total / 2**30:,.1f} GiB (limit {MAX_MODEL_BYTES / 2**30:.0f} GiB)")
        raise ModelFileError(f"refusing to load {path}: {what}; this is not a pneumo model file")


def _square_rgb_input_size(model: keras.Model, path: Path) -> int | None:
    """The side ``n`` of a model taking ``(batch, n, n, 3)`` (``None`` if not fixed), else
    :class:`ModelFileError`: pneumo models take one square RGB image per example, of
    :data:`~pneumo_utils.io.MIN_IMAGE_SIZE` to :data:`~pneumo_utils.io.MAX_IMAGE_SIZE` px."""
    shapes = [tuple(t.shape) for t in model.inputs]
    if len(shapes) == 1 and len(shapes[0]) == 4:
        _, h, w, channels = shapes[0]
        if channels == 3 and h == w:
            if h is not None and not MIN_IMAGE_SIZE <= int(h) <= MAX_IMAGE_SIZE:
                raise ModelFileError(
                    f"{path} takes {h}x{w} px input; pneumo models take {MIN_IMAGE_SIZE} to "
                    f"{MAX_IMAGE_SIZE} px (a larger input multiplies the memory of every "
                    "batch): rebuild the model at a size in that range"
                )
            return None if h is None else int(h)
    shown = ", ".join(str(s) for s in shapes) or "none"
    raise ModelFileError(
        f"{path} expects (h, w, 3) RGB input with h == w (one square RGB image, as the "
        f"pneumo builders make), but its input shape is {shown}"
    )
