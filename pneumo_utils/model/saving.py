"""The saved-model contract: a ``.keras`` file plus its JSON sidecar.

A trained model travels as ``NAME.keras`` plus a JSON sidecar ``NAME.json`` holding the
backbone, image size, task and class names, output and decision (a threshold and how it was
chosen, or argmax), and the data and metrics summary. A binary task's model ends in one
sigmoid unit, P(second class); a three-class model in a softmax with one unit per class.
:func:`load_model` returns both; prediction and evaluation need nothing else.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras

from pneumo_utils import CLASS_NAMES, __version__
from pneumo_utils.files import atomic_path, file_digest, write_json_atomic
from pneumo_utils.model.preprocessing import HistogramEqualization  # noqa: F401  (registers the layer for loading)
from pneumo_utils.sidecar import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    TASK_CLASS_NAMES,
    ModelFileError,
    check_fingerprint,
    check_output,
    read_sidecar,
    signed,
    validate_metadata,
)

MAX_MODEL_BYTES = 2**31
"""Largest total uncompressed size of a ``.keras`` archive that :func:`load_model` opens
(a ResNet50 classifier is about 100 MB)."""


MAX_CONFIG_BYTES = 64 * 2**20
"""Largest uncompressed JSON member (``config.json``, ``metadata.json``) of a ``.keras``
archive; a DenseNet121 config is under 1 MB."""


def model_metadata(model: keras.Model, task: str | None = None, **info: Any) -> dict:
    """Sidecar metadata for a model: what it is, how to feed it, and how to read its output.

    ``task`` (a name in :data:`pneumo_utils.data.tasks.TASKS`) sets ``class_names``. Without it
    the task is the one whose class names ``info`` gives; with no class names, ``pneumonia``
    for a sigmoid model and the task with as many classes for a softmax one; other class
    names (an NIH finding) write no task. ``output`` and ``decision`` come from the model's
    last layer: a sigmoid model decides with ``threshold`` (default 0.5), a softmax model by
    argmax and has no threshold (``threshold=None``, as a multi-class evaluation gives, writes
    none). ``image_size`` is the model's input side, or for a model that accepts any size
    (``Input(shape=(None, None, 3))``) the side it was trained at, which it then needs. Raises
    :class:`~pneumo_utils.sidecar.ModelFileError` when the model's output does not fit the
    task.
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
    side = info.pop("image_size", None) or model.inputs[0].shape[1]
    if side is None:
        raise ModelFileError(
            f"model {model.name} accepts any image size; give the side it was trained at, "
            "model_metadata(model, image_size=N)"
        )
    meta: dict[str, Any] = {
        "name": model.name,
        "image_size": int(side),
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

    Raises :class:`~pneumo_utils.sidecar.ModelFileError` (naming ``path``, or the model) for any
    other output: several outputs, another activation, a two-unit softmax (whose first
    column would be read as P(positive)).
    """
    outputs = model.outputs
    shape = tuple(outputs[0].shape) if len(outputs) == 1 else None
    layer = getattr(outputs[0], "_keras_history", [None])[0] if outputs else None
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    from pneumo_utils.model.ensemble import members_of

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


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON sidecar that travels with ``model_path`` (same stem, ``.json``)."""
    return Path(model_path).with_suffix(".json")


def save_model(model: keras.Model, path: str | Path, metadata: dict | None = None) -> Path:
    """Save ``model`` and its sidecar atomically (temporary file, then rename).

    An interrupted run never leaves a half-written model under ``path``; the temporary file
    of a save that was killed (its name carries the process id) is removed by the next save
    into the same folder. The sidecar records the SHA-256 of the ``.keras`` file it was
    written with (``sha256``: ``{"keras": ...}``, replacing any digests in ``metadata``, whose
    exports describe other weights) and the ``fingerprint`` binding it to the fields that
    decide what a prediction means (:func:`~pneumo_utils.sidecar.signed`), so
    :func:`load_model` refuses it beside another model or after one of those fields is edited.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    meta = metadata if metadata is not None else model_metadata(model)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        digest = file_digest(tmp)
    write_json_atomic(sidecar_path(path), signed(meta, {"keras": digest}))
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.STEM.PID.*.keras`` files (the temporaries of :func:`~pneumo_utils.files.atomic_path`)
    in ``path``'s folder whose process is gone."""
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
    sidecar fails :func:`~pneumo_utils.sidecar.validate_metadata`, when its ``image_size``
    disagrees with the model's input, or when its task does not fit the output
    (:func:`~pneumo_utils.sidecar.check_output`: a sigmoid model with a three-class sidecar, a
    softmax model whose sidecar names no multi-class task or is missing, a softmax of the
    wrong width), or when it lacks its fingerprint, records the SHA-256 of another ``.keras``
    file or was edited after it was written (:func:`~pneumo_utils.sidecar.check_fingerprint`).
    Without a sidecar, the metadata of a
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
        with warnings.catch_warnings():  # an ensemble's members keep the optimizers they trained with;
            # compile=False loads none of them, and inference needs none
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer", category=UserWarning)
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
    :data:`~pneumo_utils.sidecar.MIN_IMAGE_SIZE` to :data:`~pneumo_utils.sidecar.MAX_IMAGE_SIZE` px."""
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
