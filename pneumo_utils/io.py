"""Files that travel with results: atomic writes, and the model sidecar's reader.

Every write goes to a uniquely named temporary file in the target's own folder (so the final
rename stays on one file system and is atomic), then replaces the target in one step. Several
processes writing the same file at once each leave a complete file; the last one wins.

A model's JSON sidecar is read and checked against :data:`SIDECAR_SCHEMA` here, without
TensorFlow, so that a command line can refuse a bad sidecar before loading a model.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ModelFileError",
    "read_sidecar",
    "validate_metadata",
    "write_bytes_atomic",
    "write_json_atomic",
]

NEGATIVE_CLASS_NAMES = ("normal", "no finding")
"""Accepted first entries of a sidecar's ``class_names`` (compared case-insensitively): the
model's output is the probability of the second class, so the negative class comes first."""


class ModelFileError(ValueError):
    """A file is not a pneumo/Keras model, or does not fit the data it is given."""


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file and a rename.

    ``mode`` sets the file's permissions (default: ``0o666`` less the umask, as ``open``
    would give); ``tempfile.mkstemp`` alone would leave ``0o600``. No temporary file
    survives a failed write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`).

    NumPy scalars and arrays are written as plain numbers and lists; anything else that JSON
    cannot hold is written as its ``str``.
    """
    text = json.dumps(obj, indent=2, default=_json_default)
    return write_bytes_atomic(path, text.encode())


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


SIDECAR_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "image_size": {"type": "integer", "minimum": 1, "maximum": 4096},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "class_names": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 2,
            "maxItems": 2,
            "uniqueItems": True,
        },
        "threshold_rule": {"type": "string"},
    },
}
"""JSON schema of the sidecar fields that prediction reads; other fields are free."""

_FIELD_RULES = {
    "image_size": "a positive integer (the model's input side in pixels)",
    "threshold": "a number from 0 to 1",
    "temperature": "a number above 0",
    "class_names": '[negative, positive] class names, e.g. ["NORMAL", "PNEUMONIA"]',
    "threshold_rule": "a string",
}


def validate_metadata(meta: Any, source: str | Path = "model metadata") -> dict:
    """Check sidecar metadata against :data:`SIDECAR_SCHEMA`; return it unchanged.

    Raises :class:`ModelFileError` naming ``source`` and the first bad field: a threshold that
    is NaN, outside 0..1, ``null`` or ``true``; a temperature that is not a positive number;
    ``class_names`` that are not two names with the negative class first (reversed names
    would flip every label); a sidecar that is not a JSON object.
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
    names = meta.get("class_names")
    if names is not None and names[0].strip().casefold() not in NEGATIVE_CLASS_NAMES:
        raise ModelFileError(
            f"{source}: field class_names is {json.dumps(names)}, expected the negative class "
            'first ("NORMAL" or "No Finding"): the model\'s output is the probability of the '
            "second name; fix the order"
        )
    return meta


@functools.cache
def _sidecar_validator():
    """:data:`SIDECAR_SCHEMA` compiled to a Python function (``fastjsonschema``: a few
    milliseconds, where importing ``jsonschema`` takes seconds)."""
    import fastjsonschema

    return fastjsonschema.compile(SIDECAR_SCHEMA)


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON at ``path`` (``{}`` when there is none), validated.

    ``NaN`` and ``Infinity`` (which Python's ``json`` accepts) are read as the strings
    ``"NaN"``/``"Infinity"`` so that the schema names the field that holds them.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(), parse_constant=str)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"sidecar {path} is not valid JSON: {exc}") from None
    return validate_metadata(meta, f"sidecar {path}")
