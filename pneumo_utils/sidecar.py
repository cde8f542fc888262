"""The model sidecar: the JSON file beside each saved model, read and checked without TensorFlow.

A sidecar is read and checked against :data:`SIDECAR_SCHEMA` here, so that a command line can
refuse a bad sidecar before loading a model. The sidecar names the model's task
(:data:`TASK_CLASS_NAMES`), its class names, its output (``sigmoid``: one unit, P(second
class); ``softmax``: one unit per class) and how a prediction becomes a class (``threshold``
or ``argmax``); :func:`check_output` refuses a model whose output does not fit them, and
:func:`check_fingerprint` one whose file is not the one the sidecar describes, or whose
sidecar was edited after it was written (:func:`signed` writes the ``fingerprint``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_utils import CLASS_NAMES, TASK_CLASS_NAMES
from pneumo_utils.files import file_digest, json_depth

__all__ = [
    "TASK_CLASS_NAMES",
    "ModelFileError",
    "check_fingerprint",
    "check_output",
    "check_probabilities",
    "class_names_of",
    "fingerprint",
    "read_sidecar",
    "signed",
    "validate_metadata",
]

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512
"""Smallest and largest model input side (pixels) a sidecar or a model may declare: the
project's models take 64-224 px (tests 32 px); a larger input multiplies the memory of every
batch (a 4096 px image is 200 MB as float32) and is refused."""

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
"""Range of a sidecar's ``temperature``: the bounds :func:`pneumo_utils.evaluation.metrics.fit_temperature`
searches. A temperature near 0 would turn any output into a 0% or 100% "confidence"."""

MAX_SIDECAR_BYTES = 2**20
"""Largest sidecar file read (1 MiB): a real one, metrics and exports included, is a few KB."""

MAX_SIDECAR_DEPTH = 32
"""Deepest nesting of JSON arrays and objects in a sidecar (a real one nests 5 levels);
checked before parsing, as a deeply nested file exhausts the parser's recursion."""

FINGERPRINT_KINDS = ("keras", "onnx", "tflite")
"""Model file kinds (file suffixes) whose SHA-256 a sidecar's ``sha256`` field records."""

FINGERPRINT_FIELDS = ("task", "class_names", "output", "decision", "image_size", "threshold",
                      "temperature", "uncertain", "input_check")
"""Sidecar fields that decide what a model's output means (its classes, how an output becomes a
class, how confident it reads, which images it refuses): :func:`fingerprint` binds them to the
model files' SHA-256, so an edited field is refused, not believed."""

NEGATIVE_CLASS_NAMES = ("normal", "no finding")
"""Accepted first entries of a sidecar's ``class_names`` (compared case-insensitively): the
model's output is the probability of the second class, so the negative class comes first."""


class ModelFileError(ValueError):
    """A file is not a pneumo/Keras model, or does not fit the data it is given."""


SIDECAR_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "image_size": {"type": "integer", "minimum": MIN_IMAGE_SIZE, "maximum": MAX_IMAGE_SIZE},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "temperature": {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
        "sha256": {
            "type": "object",
            "properties": {kind: {"type": "string", "pattern": "^[0-9a-f]{64}$"}
                           for kind in FINGERPRINT_KINDS},
            "additionalProperties": False,
        },
        "class_names": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 2,
            "maxItems": max(len(names) for names in TASK_CLASS_NAMES.values()),
            "uniqueItems": True,
        },
        "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "threshold_rule": {"type": "string"},
        "task": {"enum": list(TASK_CLASS_NAMES)},
        "output": {"enum": ["sigmoid", "softmax"]},
        "decision": {"enum": ["threshold", "argmax"]},
        "uncertain": {
            "type": "object",
            "properties": {"min_margin": {"type": ["number", "null"], "minimum": 0}},
        },
        "input_check": {"type": "object"},
    },
}
"""JSON schema of the sidecar fields that prediction reads; other fields are free."""

_FIELD_RULES = {
    "image_size": f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (the model's input "
                  "side in pixels)",
    "threshold": "a number from 0 to 1",
    "temperature": f"a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}",
    "sha256": f"an object mapping {', '.join(FINGERPRINT_KINDS)} to 64 hex digits (the SHA-256 "
              "of the model file)",
    "class_names": '[negative, positive] class names, e.g. ["NORMAL", "PNEUMONIA"], or the '
                   "class names of the sidecar's task",
    "fingerprint": "64 hex digits (written by pneumo when it saves, exports or calibrates a model)",
    "threshold_rule": "a string",
    "task": f"one of {', '.join(TASK_CLASS_NAMES)}",
    "output": '"sigmoid" (one unit) or "softmax" (one unit per class)',
    "decision": '"threshold" or "argmax"',
    "uncertain": "an object whose min_margin is a number >= 0 or null (the abstention band)",
    "input_check": "an object (the input check's record)",
}


def validate_metadata(meta: Any, source: str | Path = "model metadata") -> dict:
    """Check sidecar metadata against :data:`SIDECAR_SCHEMA` and its task; return it unchanged.

    Raises :class:`ModelFileError` naming ``source`` and the first bad field: a threshold that
    is NaN, outside 0..1, ``null`` or ``true``; a temperature that is not a positive number;
    a sidecar that is not a JSON object; an unknown ``task``. With a ``task``, ``class_names``
    must be that task's names in label order, ``output`` and ``decision`` must be the task's
    (``sigmoid``/``threshold`` for two classes, ``softmax``/``argmax`` for more) and a
    three-class sidecar has no threshold. Without a task, ``class_names`` are two names with
    the negative class first (reversed names would flip every label) and the model is binary.
    """
    import fastjsonschema

    try:
        _sidecar_validator()(meta)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = [str(p) for p in exc.path[1:]]
        field = ".".join(path) or "(top level)"
        rule = _FIELD_RULES.get(path[0] if path else "", "a JSON object")
        value = json.dumps(exc.value)[:60]
        raise ModelFileError(
            f"{source}: field {field} is {value}, expected {rule}; fix the field or save the "
            "model again"
        ) from None
    task, names = meta.get("task"), meta.get("class_names")
    if task is None:
        _check_binary_without_task(meta, source)
        return meta
    expected = TASK_CLASS_NAMES[task]
    if names is not None and tuple(names) != expected:
        raise ModelFileError(
            f"{source}: field class_names is {json.dumps(names)}, expected {json.dumps(expected)} "
            f"(the classes of task {task}, in label order); fix the field or the task"
        )
    binary = len(expected) == 2
    for field, wanted in (("output", "sigmoid" if binary else "softmax"),
                          ("decision", "threshold" if binary else "argmax")):
        if field in meta and meta[field] != wanted:
            raise ModelFileError(
                f"{source}: field {field} is {json.dumps(meta[field])}, expected "
                f'"{wanted}" for task {task} ({len(expected)} classes); fix the field or the task'
            )
    if not binary and "threshold" in meta:
        raise ModelFileError(
            f"{source}: field threshold is {json.dumps(meta['threshold'])}, but task {task} "
            "decides by the most probable class (argmax) and has no threshold; remove the field"
        )
    return meta


def _check_binary_without_task(meta: dict, source: str | Path) -> None:
    """A sidecar naming no task describes a binary model: two class names, negative first,
    one sigmoid unit, a threshold."""
    names = meta.get("class_names")
    if names is not None and len(names) != 2:
        raise ModelFileError(
            f"{source}: field class_names is {json.dumps(names)}, expected two names "
            f"[negative, positive] when the sidecar names no task; add the field task (one of "
            f"{', '.join(TASK_CLASS_NAMES)}) for a model with more classes"
        )
    if names is not None and names[0].strip().casefold() not in NEGATIVE_CLASS_NAMES:
        raise ModelFileError(
            f"{source}: field class_names is {json.dumps(names)}, expected the negative class "
            'first ("NORMAL" or "No Finding"): the model\'s output is the probability of the '
            "second name; fix the order"
        )
    for field, multiclass in (("output", "softmax"), ("decision", "argmax")):
        if meta.get(field) == multiclass:
            raise ModelFileError(
                f"{source}: field {field} is {json.dumps(multiclass)}, but the sidecar names no "
                "task, so the model is read as binary; add the field task (e.g. three_class)"
            )


def class_names_of(meta: dict) -> tuple[str, ...]:
    """The class names, in label order, of the model ``meta`` describes: its ``class_names``,
    else its task's, else NORMAL/PNEUMONIA."""
    if meta.get("class_names"):
        return tuple(meta["class_names"])
    if meta.get("task"):
        return TASK_CLASS_NAMES[meta["task"]]
    return tuple(CLASS_NAMES)


def check_output(meta: dict, units: int, model: str | Path, source: str) -> None:
    """Refuse a model whose last layer does not fit the task its sidecar names.

    ``units`` is the model's output width per image: 1 for a binary model (one sigmoid unit,
    P(second class)), one per class for a softmax. A softmax needs a sidecar whose task has
    that many classes (``three_class``): read as a binary model, its first column would be
    taken for a probability of disease. ``meta`` is ``{}`` when there is no sidecar;
    ``source`` names where it came from (``"sidecar PATH"``). Raises :class:`ModelFileError`
    naming the model, the source and both sides of the mismatch.
    """
    names = class_names_of(meta)
    if units == 1 and len(names) == 2:
        return
    if units == len(names) > 2 and meta.get("task"):
        return
    output = "one sigmoid unit (a binary model)" if units == 1 else f"{units} softmax units"
    if not meta:
        raise ModelFileError(
            f"{model} ends in {output} and has no {source} naming its task and "
            "classes; save it with pneumo_utils.model.saving.save_model and "
            "model_metadata(model, task='three_class')"
        )
    said = (f"task {meta['task']} with {len(names)} classes ({', '.join(names)})" if meta.get("task")
            else f"no task, so a binary model with classes {', '.join(names)}")
    raise ModelFileError(
        f"{model} ends in {output} but {source} says {said}: the metadata belongs to another "
        "model or was edited; save the model again with its own sidecar"
    )


PROBABILITY_TOLERANCE = 0.01
"""How far a model output may stray from a probability (below 0, above 1, a softmax row's
sum from 1) and still be read as one: an int8 export's outputs are quantised in steps of
1/255."""


def check_probabilities(values: np.ndarray, model: str | Path) -> np.ndarray:
    """``values`` (``(n,)`` or ``(n, units)`` model outputs) clipped to 0..1, or
    :class:`ModelFileError` when they are not probabilities: not finite, outside 0..1, or
    softmax rows (more than one unit) not summing to 1, each beyond
    :data:`PROBABILITY_TOLERANCE`. Such a model would print "nan% confidence" or
    "11459% confidence" and make every metric meaningless."""
    values = np.asarray(values, dtype=np.float64)
    problem = None
    if not np.isfinite(values).all():
        problem = "outputs that are not numbers (NaN or infinite)"
    elif values.size and (values.min() < -PROBABILITY_TOLERANCE
                          or values.max() > 1 + PROBABILITY_TOLERANCE):
        problem = f"outputs from {values.min():.4g} to {values.max():.4g}, outside 0..1"
    elif values.ndim == 2 and values.shape[1] > 1 and values.size:
        sums = values.sum(axis=1)
        worst = float(sums[np.argmax(np.abs(sums - 1))])
        if abs(worst - 1) > PROBABILITY_TOLERANCE:
            problem = f"softmax rows summing to {worst:.4g}, not 1"
    if problem:
        raise ModelFileError(
            f"{model} gives {problem}: it is not a probability model as pneumo saves them; "
            "use a model saved or exported by pneumo"
        )
    return np.clip(values, 0.0, 1.0)


@functools.cache
def _sidecar_validator():
    """:data:`SIDECAR_SCHEMA` compiled to a Python function (``fastjsonschema``: a few
    milliseconds, where importing ``jsonschema`` takes seconds)."""
    import fastjsonschema

    return fastjsonschema.compile(SIDECAR_SCHEMA)


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON at ``path`` (``{}`` when there is none), validated.

    ``NaN`` and ``Infinity`` (which Python's ``json`` accepts) are read as the strings
    ``"NaN"``/``"Infinity"`` so that the schema names the field that holds them. A file
    over :data:`MAX_SIDECAR_BYTES`, nested deeper than :data:`MAX_SIDECAR_DEPTH` (checked
    before parsing) or a path that exists but is not a file (a folder) raises
    :class:`ModelFileError`: taking it for "no sidecar" would silently predict at 0.5.
    """
    path = Path(path)
    if not path.exists():
        return {}
    if not path.is_file():
        raise ModelFileError(
            f"sidecar {path} exists but is not a file (a folder?); remove it or put the "
            "model's JSON sidecar there"
        )
    size = path.stat().st_size
    if size > MAX_SIDECAR_BYTES:
        raise ModelFileError(
            f"sidecar {path} is {size / 2**20:,.1f} MiB (limit {MAX_SIDECAR_BYTES / 2**20:.0f} "
            "MiB); a pneumo sidecar is a few KB: save the model again with its own sidecar"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"sidecar {path} is not valid JSON: {exc}") from None
    depth = json_depth(text)
    if depth > MAX_SIDECAR_DEPTH:
        raise ModelFileError(
            f"sidecar {path} nests arrays or objects {depth} deep (limit {MAX_SIDECAR_DEPTH}); "
            "it is not a pneumo sidecar: save the model again with its own sidecar"
        )
    try:
        meta = json.loads(text, parse_constant=str)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"sidecar {path} is not valid JSON: {exc}") from None
    return validate_metadata(meta, f"sidecar {path}")


def fingerprint(meta: dict) -> str:
    """The SHA-256 (hex) of the canonical JSON of ``meta``'s model digests (``sha256``) and its
    :data:`FINGERPRINT_FIELDS`; a field that is absent stays absent, so deleting one changes it.

    It ties what the sidecar says a prediction means to the model files it was written with.
    It guards against edits and mix-ups (a sidecar copied, hand-edited or half-rewritten), not
    against someone who recomputes it on purpose.
    """
    bound = {"sha256": meta.get("sha256"),
             "fields": {k: meta[k] for k in FINGERPRINT_FIELDS if k in meta}}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=_plain)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def signed(meta: dict, digests: dict[str, str]) -> dict:
    """``meta`` as plain JSON values, with ``sha256`` set to ``digests`` (model kind -> SHA-256
    of that file, see :data:`FINGERPRINT_KINDS`) and its ``fingerprint``: what every writer of
    a sidecar (save, export, calibrate) writes, so that :func:`check_fingerprint` accepts it."""
    plain = json.loads(json.dumps({**meta, "sha256": dict(digests)}, default=_plain))
    plain["fingerprint"] = fingerprint(plain)
    return plain


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as the numbers and lists JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def check_fingerprint(meta: dict, model: str | Path, source: str) -> None:
    """Refuse a sidecar that does not describe ``model`` as pneumo wrote it.

    A sidecar written by pneumo records the SHA-256 of each model file it describes under
    ``sha256`` (``keras``, and ``onnx``/``tflite`` for exports sharing it) and a ``fingerprint``
    binding those digests to the fields that decide what a prediction means
    (:data:`FINGERPRINT_FIELDS`). A sidecar lacking either, one without the digest of
    ``model``'s kind (its suffix), one whose digest is not the file's, and one whose fields do
    not give its fingerprint (edited after it was written) raise :class:`ModelFileError`
    saying to save, export or calibrate the model again. ``meta`` is ``{}`` when there is no
    sidecar (nothing to check); ``source`` names the sidecar.
    """
    if not meta:
        return
    model = Path(model)
    kind = model.suffix.lower().lstrip(".")
    recorded = meta.get("sha256")
    if not recorded or "fingerprint" not in meta:
        missing = " and ".join(f for f in ("sha256", "fingerprint")
                               if not meta.get(f))
        raise ModelFileError(
            f"{source} has no {missing} field binding it to {model.name}: nothing shows that its "
            "task, classes and threshold describe this model; save the model again "
            "(pneumo_utils.model.saving.save_model), or export or calibrate it again from a "
            "model saved by pneumo"
        )
    expected = recorded.get(kind)
    if expected is None:
        raise ModelFileError(
            f"{source} records the SHA-256 of {', '.join(sorted(recorded))} model files but not "
            f"of {model.name} ({kind}): it belongs to another model or the {kind} file is stale; "
            "export or save the model again so its sidecar describes it"
        )
    actual = file_digest(model)
    if actual != expected:
        raise ModelFileError(
            f"{model} does not match {source} (SHA-256 {actual[:12]}..., sidecar records "
            f"{expected[:12]}...): the sidecar belongs to another model or the model file was "
            "replaced; put the model's own sidecar beside it, or save the model again"
        )
    if fingerprint(meta) != meta["fingerprint"]:
        raise ModelFileError(
            f"{source} does not match its fingerprint: one of its fields "
            f"{', '.join(FINGERPRINT_FIELDS)} was changed after pneumo wrote it, so it may not "
            f"describe {model.name}; save or export the model again (or calibrate it to change "
            "its threshold)"
        )
