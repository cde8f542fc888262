"""The manifest and index of a TFRecord shards folder: schema, reading and checking.

Folder layout::

    OUT/manifest.json    what was written: source, image size and format, split rule, counts
                         per split and class, one entry per shard (images, bytes, sha256,
                         sha256 of its labels in record order), sha256 of index.csv
    OUT/index.csv        the index (row, key, label, patient, split, source, shard) of the
                         images in the shards, in row order
    OUT/train-00000-of-00012.tfrecord ...

Everything a reader believes comes from here, so every field is checked when read
(:data:`MANIFEST_SCHEMA`, :func:`check_manifest`) and ``index.csv`` must match the digest
the manifest records: an edited label in ``index.csv`` is refused, not trained on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.pixels import PIXEL_BUDGET
from pneumo_utils.sidecar import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

MANIFEST = "manifest.json"
INDEX_FILE = "index.csv"
FORMAT = "pneumo-shards/2"
SPLIT_ORDER = ("train", "val", "test")
IMAGE_FORMATS = ("jpeg", "png")
MAX_MANIFEST_BYTES = 64 * 2**20
"""Largest manifest read (64 MiB): the full NIH set in 100 MB shards is about 500 entries."""
REWRITE = "rewrite the shards with pneumo shards --data-root DIR --out DIR"
CHECK = "check the folder with pneumo shards --out DIR --verify, or " + REWRITE
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SAFE_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}-\d{5}-of-\d{5}\.tfrecord$")
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COUNT = {"type": "integer", "minimum": 0}

MANIFEST_SCHEMA: dict = {
    "type": "object",
    "required": ["format", "image_size", "image_format", "data_root", "plan", "shards", "complete"],
    "properties": {
        "format": {"const": FORMAT},
        "image_size": {"anyOf": [{"const": 0},
                                 {"type": "integer", "minimum": MIN_IMAGE_SIZE, "maximum": MAX_IMAGE_SIZE}]},
        "image_format": {"enum": [*IMAGE_FORMATS, "original"]},
        "data_root": {"type": "string", "minLength": 1},
        "source": {"type": "array", "items": {"type": "string"}},
        "split_rule": {"type": ["object", "null"]},
        "plan": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": "array", "items": _COUNT, "minItems": 2, "maxItems": 2}}},
        "shards": {"type": "object", "additionalProperties": {
            "type": "object",
            "required": ["split", "images", "bytes", "sha256", "labels_sha256"],
            "properties": {"split": {"type": "string"}, "images": _COUNT, "bytes": _COUNT,
                           "sha256": _SHA256, "labels_sha256": _SHA256},
        }},
        "complete": {"type": "boolean"},
        "images": _COUNT,
        "index_csv_sha256": _SHA256,
        "counts": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": _COUNT}},
    },
    "if": {"properties": {"complete": {"const": True}}},
    "then": {"required": ["images", "index_csv_sha256", "counts"]},
}
"""JSON schema of a manifest: the fields the reader and ``--verify`` rely on, with their types
and ranges (``image_size`` 0 for original sizes, else the model input range 32-512 px)."""

_FIELD_RULES = {
    "format": f"{FORMAT!r}",
    "image_size": f"0 (original sizes) or an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (pixels)",
    "image_format": f"one of {', '.join([*IMAGE_FORMATS, 'original'])}",
    "data_root": "the folder the images were read from",
    "plan": "{split: [[start, stop], ...]} with counts >= 0",
    "shards": "{name: {split, images, bytes, sha256, labels_sha256}} with counts >= 0 and 64 hex digits",
    "complete": "true or false",
    "images": "a count >= 0",
    "index_csv_sha256": "64 hex digits",
    "counts": "{split: {name: count >= 0}}",
}


class CorruptShardError(ValueError):
    """A shard file is missing, truncated, does not match its manifest, or a record in it is
    not what the manifest and ``index.csv`` say."""


class ShardsMismatchError(ValueError):
    """An output folder holds shards of another index or other settings."""


@functools.cache
def _validator():
    import fastjsonschema

    return fastjsonschema.compile(MANIFEST_SCHEMA)


def check_manifest(manifest, where: str | Path) -> dict:
    """``manifest`` when it passes :data:`MANIFEST_SCHEMA` and its files stay in the shards
    folder, else :class:`CorruptShardError` naming ``where`` and the field.

    Shard names are plain ``SPLIT-NNNNN-of-MMMMM.tfrecord`` file names and split names (in
    ``shards`` and ``plan``) letters, digits, ``_`` and ``-``: a manifest naming
    ``../elsewhere/x.tfrecord`` or a plan split ``../../escape`` would make the reader open,
    or the writer write, files outside the folder.
    """
    import fastjsonschema

    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise CorruptShardError(
            f"{where} is not a shards manifest (expected a JSON object with a \"shards\" "
            f"object); {REWRITE}"
        )
    for name in manifest["shards"]:
        if not _SAFE_SHARD.match(str(name)):
            raise CorruptShardError(
                f"{where} names shard {str(name)[:80]!r}, not a SPLIT-NNNNN-of-MMMMM.tfrecord file "
                "in the shards folder; refusing to read files outside it: rewrite the shards"
            )
    splits = list(manifest.get("plan") or {})
    splits += [e.get("split") for e in manifest["shards"].values() if isinstance(e, dict)]
    for split in splits:
        if not isinstance(split, str) or not _SAFE_SPLIT.match(split):
            raise CorruptShardError(
                f"{where} names split {str(split)[:80]!r}; split names are letters, digits, _ "
                "and - (a path would leave the shards folder): rewrite the shards"
            )
    if manifest.get("format") not in (None, FORMAT) and isinstance(manifest.get("format"), str):
        raise CorruptShardError(f"{where} is a {manifest['format'][:40]!r} manifest, not {FORMAT!r} "
                                f"(written by another version of pneumo); {REWRITE}")
    try:
        _validator()(manifest)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = [str(p) for p in exc.path[1:]]
        field = ".".join(path) or "the manifest"
        value = "an object" if isinstance(exc.value, dict) else json.dumps(exc.value)[:60]
        rule = _FIELD_RULES.get(path[0] if path else "", exc.message.removeprefix("data").strip())
        raise CorruptShardError(f"{where}: {field} is {value}, expected {rule}; {REWRITE}") from None
    if (manifest["image_size"] == 0) != (manifest["image_format"] == "original"):
        raise CorruptShardError(f"{where}: image_size {manifest['image_size']} does not fit "
                                f"image_format {manifest['image_format']!r}; {REWRITE}")
    return manifest


def pixel_bound(manifest: dict) -> tuple[int, int]:
    """``(side, budget)``: the side every stored image has (0: any, original sizes) and the most
    pixels one may declare, checked from its header before it is decoded."""
    side = int(manifest["image_size"])
    return side, side * side if side else PIXEL_BUDGET


def labels_digest(labels: Iterable[int]) -> str:
    """SHA-256 of a shard's labels in record order (one decimal per line): recorded per shard,
    so a label flipped in a record is caught even when the file's checksum was edited."""
    return hashlib.sha256("".join(f"{int(v)}\n" for v in labels).encode()).hexdigest()


def count_classes(index: pd.DataFrame) -> dict:
    """Images per class and patients per split, ``{split: {NORMAL, PNEUMONIA, images,
    patients}}``: recorded in the manifest, and recounted from ``index.csv`` by ``--verify``."""
    counts = {}
    for split, rows in index.groupby("split", sort=False):
        entry = {name: int((rows["label"] == label).sum()) for label, name in enumerate(CLASS_NAMES)}
        entry.update(images=int(len(rows)), patients=int(rows["patient"].nunique()))
        counts[split] = entry
    return counts


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shards folder (local or any ``tf.io.gfile`` path, e.g. ``gs://``).

    Raises ``FileNotFoundError`` when there is none, and :class:`CorruptShardError` when it
    fails :func:`check_manifest` or the writer did not finish (rerun it: it resumes).
    """
    manifest = manifest_or_none(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} is not a shards folder (no {MANIFEST}); write one with "
                                "`pneumo shards --data-root DIR --out DIR`.")
    if not manifest["complete"]:
        raise CorruptShardError(f"the shards in {folder} are incomplete (the writer was "
                                "interrupted); run the same command again to finish them.")
    return manifest


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds shards whose writer finished; False when it holds none yet
    (it may not exist) or an interrupted write, which the writer resumes. A manifest that is
    not valid JSON or fails :func:`check_manifest` raises :class:`CorruptShardError`."""
    manifest = manifest_or_none(folder)
    return manifest is not None and manifest["complete"]


def check_source(folder: str | Path, data_root: str | Path | None) -> None:
    """Raise :class:`ShardsMismatchError` when the complete shards in ``folder`` were written
    from another folder than ``data_root`` (None: any), so that a run on one data set never
    reads shards left by a run on another. Both paths are compared resolved (the writer
    records an absolute ``data_root``)."""
    written_from = Path(read_manifest(folder)["data_root"]).expanduser().resolve()
    if data_root is not None and Path(data_root).expanduser().resolve() != written_from:
        raise ShardsMismatchError(
            f"{folder} holds shards of {written_from}, not of {data_root}: write them into a new "
            f"folder, or read these with data_root {written_from}")


def manifest_or_none(folder: str | Path) -> dict | None:
    """The checked manifest of ``folder``, complete or not; None when there is none."""
    import tensorflow as tf

    path = f"{str(folder).rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        return None
    if tf.io.gfile.stat(path).length > MAX_MANIFEST_BYTES:
        raise CorruptShardError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; {REWRITE}")
    with tf.io.gfile.GFile(path, "r") as handle:
        try:
            return check_manifest(json.loads(handle.read()), path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptShardError(f"{path} is not valid JSON ({exc}); {REWRITE}") from None


def read_index(folder: str | Path) -> pd.DataFrame:
    """The index of the images in a shards folder (``row, key, label, patient, split,
    source, shard``), in row order: a split's rows in the order the reader yields them.

    ``index.csv`` must have the SHA-256 the manifest records (an edited label or row is
    refused with :class:`CorruptShardError`)."""
    import tensorflow as tf

    manifest = read_manifest(folder)
    path = f"{str(folder).rstrip('/')}/{INDEX_FILE}"
    if not tf.io.gfile.exists(path):
        raise CorruptShardError(f"{path} is missing; {REWRITE}")
    with tf.io.gfile.GFile(path, "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != manifest["index_csv_sha256"]:
        raise CorruptShardError(f"{path} does not match the sha256 in {MANIFEST} (edited after "
                                f"the shards were written: a label, row or split changed); {REWRITE}")
    return pd.read_csv(io.BytesIO(data), dtype={"patient": str, "key": str})


def file_sha256(path: str) -> str:
    """SHA-256 of a local or ``tf.io.gfile`` file, read in 1 MiB blocks."""
    import tensorflow as tf

    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_files(folder: str | Path, split: str, verify: str = "size") -> list[str]:
    """Paths of the shards of ``split``, in order, checked as ``verify`` says.

    ``"size"`` (cheap): each file exists and has the size the manifest records;
    ``"sha256"``: its checksum matches too (reads every byte); ``"none"``: no check.
    Raises :class:`CorruptShardError` naming every shard that fails.
    """
    import tensorflow as tf

    if verify not in ("size", "sha256", "none"):
        raise ValueError(f"verify must be 'size', 'sha256' or 'none', got {verify!r}")
    manifest = read_manifest(folder)
    names = sorted(n for n, e in manifest["shards"].items() if e["split"] == split)
    if not names:
        splits = sorted({e["split"] for e in manifest["shards"].values()})
        raise ValueError(f"{folder} has no shards of split {split!r}; it has {splits}")
    paths = [f"{str(folder).rstrip('/')}/{name}" for name in names]
    if verify == "none":
        return paths
    problems = []
    for name, path in zip(names, paths, strict=True):
        entry = manifest["shards"][name]
        if not tf.io.gfile.exists(path):
            problems.append(f"{path}: missing")
            continue
        size = tf.io.gfile.stat(path).length
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated "
                            "or overwritten)")
        elif verify == "sha256" and file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: contents do not match the manifest's sha256")
    if problems:
        raise CorruptShardError(
            f"{len(problems)} corrupt shard file(s):\n  " + "\n  ".join(problems)
            + "\nRerun the writer on the same --out folder to rewrite them."
        )
    return paths
