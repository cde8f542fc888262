"""A data set's index as TFRecord shards of encoded images, and a tf.data reader for them.

At the scale of the full NIH set (112,120 PNGs, about 45 GB) reading one file per image
through Python is the bottleneck, and several hosts cannot each read every file. Shards fix
both: every image is decoded once, resized and re-encoded (JPEG by default) and written with
its label, patient, split, index row and original path into ``SPLIT-NNNNN-of-MMMMM.tfrecord``
files of about ``shard_mb`` MB each. A reader then streams a few large files in parallel,
decodes in the TensorFlow graph, and splits the files (not the images) between workers.

Folder layout::

    OUT/manifest.json    what was written: source, image size and format, split rule, counts
                         per split and class, one entry per shard (images, bytes, sha256)
    OUT/index.csv        the index (row, key, label, patient, split, source, shard) of the
                         images in the shards, in row order
    OUT/train-00000-of-00012.tfrecord ...

Writing is resumable: each shard is written under a temporary name and renamed when
complete, and recorded in the manifest; a rerun with the same index and settings skips
every shard whose file matches its recorded checksum. Images that cannot be read are left
out and reported once, as :func:`pneumo_utils.data.datasets.load_kermany` does.

Command line::

    python -m pneumo_utils.shards --data-root DIR --out DIR [--image-size 224] [--shard-mb 100]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.datasets import BadImagesWarning, find_labels_csv, load_kermany, load_nih
from pneumo_utils.data.images import ImageReadError, read_image, read_resized
from pneumo_utils.files import atomic_path, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
INDEX_FILE = "index.csv"
FORMAT = "pneumo-shards/1"
SPLIT_ORDER = ("train", "val", "test")
IMAGE_FORMATS = ("jpeg", "png")
JPEG_QUALITY = 95
_SAMPLE_IMAGES = 16
_FEATURES = ("image", "label", "patient", "split", "key", "row")
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SAFE_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}-\d{5}-of-\d{5}\.tfrecord$")


class CorruptShardError(ValueError):
    """A shard file is missing, truncated or does not match its manifest checksum."""


class ShardsMismatchError(ValueError):
    """An output folder holds shards of another index or other settings."""


def check_manifest(manifest, where: str | Path) -> dict:
    """``manifest`` when its shape is a pneumo manifest whose files stay in the shards folder,
    else :class:`CorruptShardError` naming ``where``.

    Shard names are plain ``SPLIT-NNNNN-of-MMMMM.tfrecord`` file names and split names (in
    ``shards`` and ``plan``) letters, digits, ``_`` and ``-``: a manifest naming
    ``../elsewhere/x.tfrecord`` or a plan split ``../../escape`` would make the reader open,
    or the writer write, files outside the folder.
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise CorruptShardError(
            f"{where} is not a shards manifest (expected a JSON object with a \"shards\" "
            "object); rewrite the shards with python -m pneumo_utils.shards --data-root DIR --out DIR"
        )
    splits = list(manifest.get("plan") or {})
    for name, entry in manifest["shards"].items():
        if not _SAFE_SHARD.match(str(name)) or not isinstance(entry, dict):
            raise CorruptShardError(
                f"{where} names shard {str(name)[:80]!r}, not a SPLIT-NNNNN-of-MMMMM.tfrecord file "
                "in the shards folder; refusing to read files outside it: rewrite the shards"
            )
        splits.append(entry.get("split"))
    for split in splits:
        if not isinstance(split, str) or not _SAFE_SPLIT.match(split):
            raise CorruptShardError(
                f"{where} names split {str(split)[:80]!r}; split names are letters, digits, _ "
                "and - (a path would leave the shards folder): rewrite the shards"
            )
    return manifest


# --------------------------------------------------------------------------------- index


def load_index(
    data_root: str | Path,
    kind: str = "auto",
    finding: str = "Pneumonia",
    balance: bool = True,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 42,
) -> tuple[pd.DataFrame, dict]:
    """The split index of a data set and how it was split, as the notebooks make it.

    ``kind`` ``"kermany"``: :func:`~pneumo_utils.data.datasets.load_kermany` and a patient-grouped
    validation split carved from train (:func:`pneumo_utils.data.splits.grouped_split`), test as
    published. ``"nih"``: :func:`~pneumo_utils.data.datasets.load_nih` (normal vs ``finding``,
    normals downsampled when ``balance``) and a patient-level train/val/test split
    (:func:`pneumo_utils.data.splits.patient_split`). ``"auto"``: ``nih`` when ``data_root`` is a
    CSV or holds one, else ``kermany``. Defaults match notebooks 01 and 02 (seed 42).
    """
    from pneumo_utils.data.splits import grouped_split, patient_split

    root = Path(data_root).expanduser()
    if kind == "auto":
        kind = "nih" if root.is_file() or _holds_csv(root) else "kermany"
    if kind == "kermany":
        index = grouped_split(load_kermany(root), val_fraction=val_fraction, seed=seed)
        rule = {"how": "pneumo_utils.data.splits.grouped_split", "val_fraction": val_fraction, "seed": seed}
    elif kind == "nih":
        index = load_nih(root, finding=finding, balance=balance, seed=seed)
        index = patient_split(index, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
        rule = {"how": "pneumo_utils.data.splits.patient_split", "finding": finding, "balance": balance,
                "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    else:
        raise ValueError(f"kind must be 'auto', 'kermany' or 'nih', got {kind!r}")
    return index, rule


def _holds_csv(root: Path) -> bool:
    if not root.is_dir():
        return False
    try:
        find_labels_csv(root)
    except (ValueError, FileNotFoundError):
        return False
    return True


# -------------------------------------------------------------------------------- writer


def encode_image(path: str | Path, image_size: int = 224, image_format: str = "jpeg") -> bytes:
    """One image file as encoded bytes for a shard.

    With ``image_size`` > 0 the image is read as the folder pipeline reads it
    (:func:`pneumo_utils.data.images.read_resized`: any supported format, EXIF orientation,
    ``INTER_AREA`` shrinking) and encoded as ``image_format`` (JPEG quality
    :data:`JPEG_QUALITY`, or lossless PNG), in one grey channel when the three are equal.
    With ``image_size`` 0 the original bytes are kept when TensorFlow decodes them to the
    same pixels (8-bit grey or RGB JPEG/PNG, no EXIF rotation); other files (DICOM, 16-bit
    PNG, rotated JPEG) are stored as lossless PNG at full size. Raises
    :class:`~pneumo_utils.data.images.ImageReadError` for an unreadable file.
    """
    if image_size:
        pixels = read_resized(path, int(image_size))
    else:
        original = _original_bytes(Path(path))
        if original is not None:
            return original
        pixels, image_format = read_image(path), "png"
    grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all())
    if image_format == "jpeg":
        import simplejpeg

        if grey:
            return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels[..., :1]), quality=JPEG_QUALITY,
                                          colorspace="GRAY", colorsubsampling="Gray")
        return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=JPEG_QUALITY,
                                      colorspace="RGB", colorsubsampling="444")
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if grey else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _original_bytes(path: Path) -> bytes | None:
    """The file's bytes when ``tf.io.decode_image`` reads them as :mod:`images` does."""
    try:
        with Image.open(path) as im:
            plain = im.format in ("JPEG", "PNG") and im.mode in ("L", "RGB")
            plain = plain and im.getexif().get(0x0112, 1) == 1
    except OSError:
        return None
    return path.read_bytes() if plain else None


def write_shards(
    index: pd.DataFrame,
    out: str | Path,
    data_root: str | Path | None = None,
    image_size: int = 224,
    image_format: str = "jpeg",
    shard_mb: float = 100.0,
    min_shards: int = 8,
    images_per_shard: int | None = None,
    split_rule: dict | None = None,
    workers: int | None = None,
    verbose: bool = True,
) -> dict:
    """Write the images of ``index`` into TFRecord shards in ``out``; returns the manifest.

    Parameters
    ----------
    index : the index (``path, label, patient, split``; ``source`` when present), e.g. from
        :func:`load_index`. Rows are written split by split (train, val, test, then any
        other), in index order within a split; their position is the record's ``row``.
    data_root : keys (``index.csv``'s ``key``, the record's ``key``) are paths relative to
        it; default: the paths' common folder.
    image_size : side of the stored images in pixels; 0 keeps the original files
        (see :func:`encode_image`).
    image_format : ``"jpeg"`` or ``"png"`` for re-encoded images.
    shard_mb : target shard size in MB (1e6 bytes), from the encoded size of a sample.
    min_shards : at least this many shards per split (fewer when the split has fewer
        images), so the files can be split between up to that many workers.
    images_per_shard : fixes the images per shard instead of ``shard_mb``.
    split_rule : how the splits were made, recorded in the manifest.
    workers : threads decoding and encoding images (default: one per CPU).

    A rerun with the same index and settings skips every shard already written (its file
    matches the manifest's sha256); an ``out`` holding shards of anything else raises
    :class:`ShardsMismatchError`. Each shard is written under a temporary name and renamed
    when complete, and the manifest is updated after every shard, so an interruption loses
    at most the shard in progress and leaves no partial file.
    """
    import tensorflow as tf

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if int(image_size) < 0:
        raise ValueError(f"image_size must be 0 (original files) or positive, got {image_size!r}")
    missing = [c for c in ("path", "label", "patient", "split") if c not in index.columns]
    if missing:
        raise ValueError(f"index is missing column(s) {missing}; expected path, label, patient, split")
    unsafe = sorted({str(s) for s in index["split"]} - {str(s) for s in index["split"]
                                                      if _SAFE_SPLIT.match(str(s))})
    if unsafe:
        raise ValueError(f"index split name(s) {unsafe[:3]} are not letters, digits, _ and -; "
                         "shard files are named after their split")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _remove_partial_files(out)
    table = _ordered(index, data_root)
    settings = {
        "format": FORMAT,
        "image_size": int(image_size),
        "image_format": image_format if image_size else "original",
        "source": sorted(table["source"].unique().tolist()),
        "index_sha256": _index_fingerprint(table),
    }
    manifest = _resume(out, settings)
    if manifest is None:
        manifest = {**settings, "data_root": str(table.attrs["data_root"]), "split_rule": split_rule,
                    "plan": _plan(table, image_size, image_format, shard_mb, min_shards, images_per_shard),
                    "shards": {}, "skipped": [], "complete": False}
    start = time.perf_counter()
    encoded = reused = 0
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        for split, bounds in manifest["plan"].items():
            rows = table[table["split"] == split]
            for number, (lo, hi) in enumerate(bounds):
                name = f"{split}-{number:05d}-of-{len(bounds):05d}.tfrecord"
                entry = manifest["shards"].get(name)
                if entry is not None and _file_sha256(out / name) == entry["sha256"]:
                    reused += 1
                    continue
                part = rows.iloc[lo:hi]
                bad: list[dict] = []

                def records(part=part, bad=bad, name=name):
                    images = pool.map(lambda p: _try_encode(p, image_size, image_format), part["path"])
                    for image, row in zip(images, part.itertuples(index=False), strict=True):
                        if isinstance(image, str):
                            bad.append({"path": row.path, "reason": image, "shard": name})
                        else:
                            yield _example(tf, image, row)

                manifest["shards"][name] = _write_shard(tf, out / name, records(), split, lo, hi)
                manifest["skipped"] = [s for s in manifest["skipped"] if s["shard"] != name] + bad
                encoded += hi - lo
                write_json_atomic(out / MANIFEST, manifest)
                if verbose:
                    seconds = time.perf_counter() - start
                    print(f"shards: {name} {manifest['shards'][name]['images']} images, "
                          f"{manifest['shards'][name]['bytes'] / 1e6:.1f} MB "
                          f"({encoded / max(seconds, 1e-9):.0f} images/s)", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    skipped_paths = {s["path"] for s in manifest["skipped"]}
    if manifest["skipped"]:
        listing = "\n".join(f"  {s['path']}: {s['reason']}" for s in manifest["skipped"])
        warnings.warn(f"left {len(manifest['skipped'])} unreadable image(s) out of the shards:\n"
                      f"{listing}", BadImagesWarning, stacklevel=2)
    written = table[~table["path"].isin(skipped_paths)]
    manifest["counts"] = _counts(written)
    manifest["images"] = int(len(written))
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    manifest["reused_shards"] = reused
    written = written.assign(shard=[_shard_of(manifest["plan"], s, p) for s, p in
                                    zip(written["split"], written["position"], strict=True)])
    csv = written[["row", "key", "label", "patient", "split", "source", "shard"]].to_csv(index=False)
    write_bytes_atomic(out / INDEX_FILE, csv.encode())
    write_json_atomic(out / MANIFEST, manifest)
    if verbose:
        print(f"shards: {manifest['images']} images in {len(manifest['shards'])} shards in {out} "
              f"({reused} reused, {encoded} images encoded in {manifest['seconds']:.0f} s)")
    return manifest


def _ordered(index: pd.DataFrame, data_root) -> pd.DataFrame:
    """The index in shard order with ``row``, ``position`` (within its split) and ``key``."""
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    extra = sorted(set(index["split"]) - set(order))
    order.update({s: len(SPLIT_ORDER) + i for i, s in enumerate(extra)})
    table = index.assign(_order=index["split"].map(order)).sort_values("_order", kind="stable")
    table = table.drop(columns="_order").reset_index(drop=True)
    if "source" not in table.columns:
        table["source"] = "index"
    paths = table["path"].astype(str)
    root = Path(data_root).expanduser() if data_root is not None else Path(
        os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) else ".")
    if root.is_file():
        root = root.parent
    table["row"] = np.arange(len(table), dtype=np.int64)
    table["position"] = table.groupby("split").cumcount()
    table["key"] = [os.path.relpath(os.path.abspath(p), os.path.abspath(root)) for p in paths]
    table["label"] = table["label"].astype(np.int64)
    table["patient"] = table["patient"].astype(str)
    table.attrs["data_root"] = root
    return table


def _index_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 over every row's key, label, patient and split, and its file's size and
    modification time (a changed image file changes the fingerprint)."""
    digest = hashlib.sha256()
    for path, key, label, patient, split in zip(table["path"], table["key"], table["label"],
                                                table["patient"], table["split"], strict=True):
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{key}\0{label}\0{patient}\0{split}\0{stamp}\n".encode())
    return digest.hexdigest()


def _plan(table, image_size, image_format, shard_mb, min_shards, images_per_shard) -> dict:
    """``{split: [[start, stop], ...]}``: positions within each split per shard, sizes even."""
    plan = {}
    for split, rows in table.groupby("split", sort=False):
        n = len(rows)
        per_shard = images_per_shard
        if per_shard is None:
            sample = rows["path"].iloc[np.linspace(0, n - 1, min(n, _SAMPLE_IMAGES)).astype(int)]
            sizes = [len(e) for e in (_try_encode(p, image_size, image_format) for p in sample)
                     if not isinstance(e, str)]
            mean = float(np.mean(sizes)) if sizes else 1e5
            per_shard = max(1, int(shard_mb * 1e6 // max(mean, 1.0)))
        n_shards = max(math.ceil(n / int(per_shard)), min(int(min_shards), n), 1)
        edges = np.linspace(0, n, n_shards + 1).round().astype(int)
        plan[split] = [[int(a), int(b)] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return plan


def _shard_of(plan: dict, split: str, position: int) -> str:
    bounds = plan[split]
    number = next(i for i, (lo, hi) in enumerate(bounds) if lo <= position < hi)
    return f"{split}-{number:05d}-of-{len(bounds):05d}.tfrecord"


def _try_encode(path: str, image_size: int, image_format: str) -> bytes | str:
    """Encoded bytes, or the reason the image could not be read."""
    try:
        return encode_image(path, image_size, image_format)
    except FileNotFoundError:
        return "file not found"
    except ImageReadError as exc:
        return exc.reason
    except (OSError, ValueError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__


def _example(tf, image: bytes, row) -> bytes:
    """One serialised ``tf.train.Example`` (see :data:`_FEATURES`)."""
    def as_bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def as_int(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    features = {
        "image": as_bytes(image),
        "label": as_int(row.label),
        "patient": as_bytes(str(row.patient).encode()),
        "split": as_bytes(str(row.split).encode()),
        "key": as_bytes(str(row.key).encode()),
        "row": as_int(row.row),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _write_shard(tf, path: Path, records: Iterable[bytes], split: str, lo: int, hi: int) -> dict:
    """Write records to ``path`` through a temporary file and a rename; the manifest entry.

    ``records`` may encode images as it is consumed: whatever stops it (an error, Ctrl-C)
    leaves no file behind."""
    count = 0
    with atomic_path(path, suffix=".partial") as tmp:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for record in records:
                writer.write(record)
                count += 1
        digest = _file_sha256(tmp)
        size = tmp.stat().st_size
    return {"split": split, "positions": [lo, hi], "images": count, "bytes": size,
            "sha256": digest}


def _remove_partial_files(out: Path) -> None:
    """Temporary shard files left by a run that was killed (``.NAME.PID.XXXX.partial``)."""
    for stale in out.glob(".*.tfrecord.*.partial"):
        stale.unlink(missing_ok=True)


def _resume(out: Path, settings: dict) -> dict | None:
    """The manifest in ``out`` when it was written for the same index and settings."""
    path = out / MANIFEST
    if not path.is_file():
        if any(out.glob("*.tfrecord")):
            raise ShardsMismatchError(f"{out} holds .tfrecord files but no {MANIFEST}; write to "
                                      "an empty folder or delete those files.")
        return None
    try:
        manifest = check_manifest(json.loads(path.read_text()), path)
    except json.JSONDecodeError as exc:
        raise CorruptShardError(f"{path} is not valid JSON ({exc}); delete the folder and "
                                "write the shards again") from None
    different = [k for k, v in settings.items() if manifest.get(k) != v]
    if different:
        raise ShardsMismatchError(
            f"{out} holds shards written with other {', '.join(different)} (see {path}); write to "
            "another --out folder, or delete this one to start again."
        )
    return manifest


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _counts(table: pd.DataFrame) -> dict:
    """Images per class and patients per split, ``{split: {NORMAL, PNEUMONIA, images,
    patients}}``."""
    counts = {}
    for split, rows in table.groupby("split", sort=False):
        entry = {name: int((rows["label"] == label).sum()) for label, name in enumerate(CLASS_NAMES)}
        entry.update(images=int(len(rows)), patients=int(rows["patient"].nunique()))
        counts[split] = entry
    return counts


# -------------------------------------------------------------------------------- reader


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shards folder (local or any ``tf.io.gfile`` path, e.g. ``gs://``).

    Raises ``FileNotFoundError`` when there is none, and :class:`CorruptShardError` when the
    writer did not finish (rerun it: it resumes).
    """
    manifest = _manifest_or_none(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} is not a shards folder (no {MANIFEST}); write one with "
                                "`python -m pneumo_utils.shards --data-root DIR --out DIR`.")
    if not manifest.get("complete"):
        raise CorruptShardError(f"the shards in {folder} are incomplete (the writer was "
                                "interrupted); run the same command again to finish them.")
    return manifest


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds shards whose writer finished; False when it holds none yet
    (it may not exist) or an interrupted write, which :func:`write_shards` resumes. A
    manifest that is not valid JSON or not a pneumo manifest raises
    :class:`CorruptShardError`."""
    manifest = _manifest_or_none(folder)
    return manifest is not None and bool(manifest.get("complete"))


def check_source(folder: str | Path, data_root: str | Path | None) -> None:
    """Raise :class:`ShardsMismatchError` when the complete shards in ``folder`` were written
    from another folder than ``data_root`` (None: any), so that a run on one data set never
    reads shards left by a run on another."""
    written_from = Path(read_manifest(folder)["data_root"]).expanduser().resolve()
    if data_root is not None and Path(data_root).expanduser().resolve() != written_from:
        raise ShardsMismatchError(
            f"{folder} holds shards of {written_from}, not of {data_root}: write them into a new "
            f"folder, or read these with data_root {written_from}")


def _manifest_or_none(folder: str | Path) -> dict | None:
    """The checked manifest of ``folder``, complete or not; None when there is none."""
    import tensorflow as tf

    path = f"{str(folder).rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as handle:
        try:
            return check_manifest(json.loads(handle.read()), path)
        except json.JSONDecodeError as exc:
            raise CorruptShardError(f"{path} is not valid JSON ({exc}); rewrite the shards") from None


def read_index(folder: str | Path) -> pd.DataFrame:
    """The index of the images in a shards folder (``row, key, label, patient, split,
    source, shard``), in row order: a split's rows in the order of :func:`predict_from_shards`."""
    import tensorflow as tf

    read_manifest(folder)
    with tf.io.gfile.GFile(f"{str(folder).rstrip('/')}/{INDEX_FILE}", "r") as handle:
        return pd.read_csv(handle, dtype={"patient": str, "key": str})


def read_split_index(folder: str | Path, finding: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The index of a shards folder in the notebooks' shape, and the split rule it was written with.

    Returns :func:`read_index` (``row, key, label, patient, split, source, shard``, in row
    order) with ``path``, where each image was read from when the shards were written
    (``data_root/key`` of the manifest; the file need not exist any more), so that the
    split, summary and report helpers of :mod:`pneumo_utils.data` take it as they take a
    folder's index; and the manifest's ``split_rule`` (``{}`` when none was recorded). The
    splits are the ones the shards were written with: a notebook reading shards uses them
    as they are, so that every run on the same shards has the same patients in each split.

    With ``finding`` the shards must hold an NIH-style binary task split by patient
    (:func:`load_index` with ``kind="nih"``), and, when written from the NIH table, labels of
    that finding (label 1 = ``finding`` present): otherwise ``ValueError`` says what they
    hold and how to write the right ones.
    """
    manifest = read_manifest(folder)
    rule = dict(manifest.get("split_rule") or {})
    if finding is not None:
        how = str(rule.get("how", "not recorded"))
        if not how.endswith("patient_split"):
            raise ValueError(
                f"the shards in {folder} were split by {how} (source {manifest['source']}), not by "
                "patient for an NIH-style task; write NIH shards with python -m pneumo_utils.shards "
                "--data-root NIH_DIR --out OTHER_DIR"
            )
        held = str(rule.get("finding", ""))
        if manifest["source"] == ["nih"] and held.lower() != finding.lower():
            raise ValueError(
                f"the shards in {folder} hold {held!r} against No Finding, not {finding!r}: set "
                f"finding={held!r}, or write {finding!r} shards into another folder with python -m "
                f"pneumo_utils.shards --data-root NIH_DIR --out OTHER_DIR --finding {finding!r}"
            )
    index = read_index(folder)
    root = str(manifest.get("data_root", "")).rstrip("/")
    return index.assign(path=[f"{root}/{key}" for key in index["key"]]), rule


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
        elif verify == "sha256" and _gfile_sha256(tf, path) != entry["sha256"]:
            problems.append(f"{path}: contents do not match the manifest's sha256")
    if problems:
        raise CorruptShardError(
            f"{len(problems)} corrupt shard file(s):\n  " + "\n  ".join(problems)
            + "\nRerun the writer on the same --out folder to rewrite them."
        )
    return paths


def verify_shards(folder: str | Path) -> dict:
    """Check every shard's size and sha256 against the manifest, and the records of each
    shard (row and key, in order) against the index, so that a shard swapped for another
    of the same split, with its checksum edited to match, or an edited image count is
    caught; raises :class:`CorruptShardError` naming the bad files, else returns the
    manifest."""
    import tensorflow as tf

    manifest = read_manifest(folder)
    for split in sorted({e["split"] for e in manifest["shards"].values()}):
        shard_files(folder, split, verify="sha256")
    index = read_index(folder)
    spec = {"row": tf.io.FixedLenFeature([], tf.int64), "key": tf.io.FixedLenFeature([], tf.string)}
    problems = []
    for name, entry in sorted(manifest["shards"].items()):
        path = f"{str(folder).rstrip('/')}/{name}"
        expected = index[index["shard"] == name].sort_values("row")
        found = []
        try:
            for record in tf.data.TFRecordDataset(path):
                parsed = tf.io.parse_single_example(record, spec)
                found.append((int(parsed["row"]), parsed["key"].numpy().decode()))
        except tf.errors.OpError as exc:
            problems.append(f"{path}: cannot be read ({exc.message.splitlines()[0]})")
            continue
        wanted = list(zip(expected["row"].astype(int), expected["key"].astype(str), strict=True))
        if found != wanted or entry.get("images") != len(found):
            problems.append(f"{path}: holds {len(found)} records that are not the {len(wanted)} "
                            f"rows index.csv gives it (manifest: {entry.get('images')} images)")
    if problems:
        raise CorruptShardError(
            f"{len(problems)} shard file(s) do not match the index:\n  " + "\n  ".join(problems)
            + "\nRerun the writer on the same --out folder to rewrite them."
        )
    return manifest


def _gfile_sha256(tf, path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_shards(
    folder: str | Path,
    split: str,
    image_size: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    shuffle_buffer: int = 2048,
    input_context=None,
    verify: str = "size",
    with_rows: bool = False,
):
    """A tf.data pipeline of ``(images, labels)`` batches from the shards of one split.

    Yields ``float32`` images ``(batch, image_size, image_size, 3)`` in 0-255 and ``float32``
    labels ``(batch,)``, as :func:`pneumo_utils.data.pipelines.image_dataset` does, so the same models
    and training code take either. ``image_size`` defaults to the stored size; another size
    is resized in the graph (bilinear with antialiasing).

    The shard files are read in parallel and interleaved (shuffled, when ``shuffle``, then
    records shuffled in a ``shuffle_buffer``, seeded by ``seed``, reshuffled every epoch);
    without ``shuffle`` the records come in row order (:func:`read_index`). Images are
    decoded in parallel in the graph; ``cache`` keeps the decoded ``uint8`` images in memory
    (``True``) or in a file (a path); ``repeat`` repeats forever (pass ``steps_per_epoch``
    to ``fit``); batches are prefetched.

    Under a multi-worker strategy the dataset is split between workers by *file*
    (``AutoShardPolicy.FILE``), so each worker reads only its shards; with
    ``input_context`` (from ``strategy.distribute_datasets_from_function``) the files are
    split here instead, and ``batch_size`` should be the per-replica batch size.
    ``verify`` checks the files first (see :func:`shard_files`). ``with_rows`` yields
    ``((images, rows), labels)``, ``rows`` (int64) being the rows of :func:`read_index`, for
    loops that must know which image each output belongs to.
    """
    return _dataset(folder, split, image_size, batch_size, shuffle, seed, cache, repeat,
                    drop_remainder, shuffle_buffer, input_context, verify, with_rows)


def _output_size(manifest: dict, image_size: int | None, folder) -> int:
    """The side images are read at: ``image_size``, else the shards' own; shards that keep
    original sizes need ``image_size``."""
    size = int(image_size or manifest["image_size"])
    if not size:
        raise ValueError(f"the shards in {folder} hold images at their original sizes; pass "
                         "image_size")
    return size


def _dataset(folder, split, image_size, batch_size, shuffle, seed, cache, repeat, drop_remainder,
             shuffle_buffer, input_context, verify, with_rows):
    import tensorflow as tf

    manifest = read_manifest(folder)
    stored, size = int(manifest["image_size"]), _output_size(manifest, image_size, folder)
    paths = shard_files(folder, split, verify=verify)
    autotune = tf.data.AUTOTUNE
    files = tf.data.Dataset.from_tensor_slices(paths)
    if input_context is not None:
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    def read(path):
        return tf.data.TFRecordDataset(path, buffer_size=8 << 20)

    if shuffle:
        records = files.interleave(read, cycle_length=min(len(paths), 16),
                                   num_parallel_calls=autotune, deterministic=False)
    else:  # one file after the other: records in row order
        records = files.interleave(read, cycle_length=1)
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "row": tf.io.FixedLenFeature([], tf.int64),
    }

    def decode(record):
        example = tf.io.parse_single_example(record, spec)
        return _decode_image(tf, example["image"], size, stored), example["label"], example["row"]

    ds = records.map(decode, num_parallel_calls=autotune, deterministic=not shuffle)
    if cache:
        ds = ds.cache("" if cache is True else str(cache))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def to_float(images, labels, rows):
        images, labels = tf.cast(images, tf.float32), tf.cast(labels, tf.float32)
        return ((images, rows), labels) if with_rows else (images, labels)

    ds = ds.map(to_float, num_parallel_calls=autotune).prefetch(autotune)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
        else tf.data.experimental.AutoShardPolicy.FILE
    )
    return ds.with_options(options)


def _decode_image(tf, encoded, size: int, stored: int):
    """A record's image as ``uint8`` ``(size, size, 3)``: decoded, and resized in the graph
    (bilinear with antialiasing) when ``size`` is not the ``stored`` size."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    if size != stored:
        image = tf.image.resize(image, [size, size], antialias=True)
        image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(image, (size, size, 3))


def read_images(
    folder: str | Path,
    rows: Sequence[int] | np.ndarray | pd.Series,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of some index rows, in the order of ``rows``, for figures.

    ``rows`` are rows of :func:`read_index` (its ``row`` column), from any splits. Returns
    ``float32`` images ``(n, image_size, image_size, 3)`` in 0-255, the pixels
    :func:`read_shards` gives for those rows (``image_size`` defaults to the stored size),
    and their ``int64`` labels ``(n,)``. Grad-CAM and sample grids need a handful of image
    arrays: only the shards that hold them are read, and only their images are decoded.
    Raises ``ValueError`` naming rows the shards do not hold, and :class:`CorruptShardError`
    for a shard that cannot be read.
    """
    import tensorflow as tf

    manifest = read_manifest(folder)
    stored, size = int(manifest["image_size"]), _output_size(manifest, image_size, folder)
    wanted = np.asarray(rows, dtype=np.int64).ravel()
    index = read_index(folder).set_index("row")
    unknown = sorted(set(wanted.tolist()) - set(index.index.tolist()))
    if unknown:
        raise ValueError(f"the shards in {folder} hold no row(s) {unknown[:5]}; rows are the "
                         f"'row' column of read_index ({len(index)} rows)")
    if not len(wanted):
        return np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int64)
    held = index.loc[wanted]
    paths = [p for split in sorted(set(held["split"]))
             for p in shard_files(folder, split) if Path(p).name in set(held["shard"])]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "row": tf.io.FixedLenFeature([], tf.int64),
    }
    targets = tf.constant(np.unique(wanted))
    ds = (tf.data.TFRecordDataset(paths)
          .map(lambda record: tf.io.parse_single_example(record, spec))
          .filter(lambda example: tf.reduce_any(tf.equal(example["row"], targets)))
          .map(lambda example: (_decode_image(tf, example["image"], size, stored),
                                example["label"], example["row"])))
    found = {}
    try:
        for image, label, row in ds.as_numpy_iterator():
            found[int(row)] = (image, int(label))
    except tf.errors.DataLossError as exc:
        raise CorruptShardError(f"a shard of {folder} holding rows {sorted(set(wanted.tolist()))[:5]} "
                                f"cannot be read: {' '.join(str(exc).split())[:300]}") from None
    lost = sorted(set(wanted.tolist()) - set(found))
    if lost:
        raise CorruptShardError(f"index.csv of {folder} places row(s) {lost[:5]} in shards that do "
                                "not hold them; check the folder with python -m pneumo_utils.shards "
                                "--out DIR --verify")
    images = np.stack([found[int(r)][0] for r in wanted]).astype(np.float32)
    return images, np.array([found[int(r)][1] for r in wanted], dtype=np.int64)


# ------------------------------------------------------------- predictions and features


class ShardOutputs(NamedTuple):
    """Model outputs over a split's shards with the index rows they belong to."""

    outputs: np.ndarray
    """``(n, ...)`` float32, in row order."""
    labels: np.ndarray
    """``(n,)`` int64 labels of those rows."""
    rows: np.ndarray
    """``(n,)`` int64 rows of :func:`read_index`, ascending."""

    def of_rows(self, rows: Sequence[int] | np.ndarray | pd.Series) -> ShardOutputs:
        """The outputs, labels and rows of index rows ``rows``, in that order: e.g. the rows a
        notebook kept after :func:`pneumo_utils.data.splits.subsample`, so that features line up
        with that index's labels and patients. Raises ``ValueError`` naming rows not here."""
        wanted = np.asarray(rows, dtype=np.int64).ravel()
        at = np.searchsorted(self.rows, wanted).clip(0, max(len(self.rows) - 1, 0))
        missing = wanted[self.rows[at] != wanted] if len(self.rows) else wanted
        if len(missing):
            raise ValueError(f"{len(missing)} row(s) are not among these outputs, e.g. "
                             f"{missing[:5].tolist()}; rows must come from the same split's shards")
        return ShardOutputs(self.outputs[at], self.labels[at], self.rows[at])


def predict_from_shards(
    model,
    folder: str | Path,
    split: str,
    strategy=None,
    batch_size: int = 32,
    verify: str = "size",
    verbose: bool = True,
) -> ShardOutputs:
    """Run ``model`` over every image of a split's shards under ``strategy``; outputs in row order.

    Each global batch (``batch_size`` per replica times the replicas) is split between the
    replicas (``strategy.run``), so the replicas share the work. The model should have been
    built inside ``strategy.scope()``. Under a multi-worker strategy every worker reads and
    returns only its own shard files (``rows`` says which images). A shard that turns out
    to be corrupt while reading raises :class:`CorruptShardError` naming it.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    size = int(model.inputs[0].shape[1])
    global_batch = batch_size * strategy.num_replicas_in_sync
    tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    ds = _dataset(folder, split, image_size=size, batch_size=global_batch, shuffle=False, seed=0,
                  cache=False, repeat=False, drop_remainder=tpu, shuffle_buffer=1,
                  input_context=None, verify=verify, with_rows=True)
    distributed = strategy.experimental_distribute_dataset(ds)

    @tf.function
    def step(inputs):
        images, rows = inputs
        return strategy.run(lambda x, r: (tf.cast(model(x, training=False), tf.float32), r),
                            args=(images, rows))

    outputs, rows, labels = [], [], []
    start = time.perf_counter()
    try:
        for inputs, batch_labels in distributed:
            out, out_rows = step(inputs)
            outputs += [t.numpy() for t in strategy.experimental_local_results(out)]
            rows += [t.numpy() for t in strategy.experimental_local_results(out_rows)]
            labels += [t.numpy() for t in strategy.experimental_local_results(batch_labels)]
    except tf.errors.DataLossError as exc:
        shard_files(folder, split, verify="sha256")
        raise CorruptShardError(f"a shard of split {split!r} in {folder} cannot be read: "
                                f"{' '.join(str(exc).split())[:300]}") from None
    order_rows = np.concatenate(rows).astype(np.int64)
    order = np.argsort(order_rows, kind="stable")
    result = ShardOutputs(np.concatenate(outputs)[order], np.concatenate(labels).astype(np.int64)[order],
                          order_rows[order])
    if tpu:
        expected = read_manifest(folder)["counts"][split]["images"]
        if len(result.rows) < expected:
            raise ValueError(f"{expected - len(result.rows)} image(s) of split {split!r} were "
                             "dropped to keep TPU batches full; lower batch_size to a divisor of "
                             f"{expected}")
    if verbose:
        seconds = time.perf_counter() - start
        print(f"{split}: {len(result.rows)} images in {seconds:.0f} s "
              f"({len(result.rows) / max(seconds, 1e-9):.1f} images/s, "
              f"{strategy.num_replicas_in_sync} replica(s))")
    return result


def extract_features_from_shards(
    model,
    folder: str | Path,
    split: str,
    strategy=None,
    batch_size: int = 32,
    cache_dir: str | Path | None = ".cache/pneumo/features",
    verbose: bool = True,
) -> ShardOutputs:
    """Pooled backbone features ``(n, channels)`` of a split's shards, under ``strategy``.

    The frozen-backbone feature cache of :mod:`pneumo_utils.model.features`, read from shards:
    ``model`` is a classifier with a ``head_gap`` layer (its layers up to the pooling run,
    see :func:`pneumo_utils.model.backbones.pooled_features_model`), the replicas share the batches
    (:func:`predict_from_shards`), and the result is cached in ``cache_dir`` under a key of
    the extractor's weights, the image size and the shards' checksums (``None``: no cache).
    ``outputs`` are the features, in row order with their ``labels`` and ``rows``; train
    the head on them with :func:`pneumo_utils.model.train.fit_head_on_features`.
    """
    import tensorflow as tf

    from pneumo_utils.model.backbones import pooled_features_model
    from pneumo_utils.model.features import weights_fingerprint
    from pneumo_utils.scale.distribute import num_workers

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        extractor = pooled_features_model(model)
    cache_file = None
    if cache_dir is not None:
        manifest = read_manifest(folder)
        workers = num_workers(strategy)
        worker = strategy.cluster_resolver.task_id if workers > 1 else 0
        parts = [weights_fingerprint(extractor), str(extractor.inputs[0].shape[1]), split,
                 f"{workers}:{worker}"]
        parts += sorted(e["sha256"] for e in manifest["shards"].values() if e["split"] == split)
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        cache_file = Path(cache_dir) / f"{model.name}-shards-{split}-{key}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as stored:
                    cached = ShardOutputs(stored["outputs"], stored["labels"], stored["rows"])
                if verbose:
                    print(f"features: {split} {cached.outputs.shape} loaded from cache {cache_file}")
                return cached
            except (OSError, ValueError, KeyError, EOFError) as exc:
                warnings.warn(f"feature cache file {cache_file} cannot be read "
                              f"({' '.join(str(exc).split())}); the features are recomputed",
                              UserWarning, stacklevel=2)
    result = predict_from_shards(extractor, folder, split, strategy, batch_size, verbose=verbose)
    if cache_file is not None:
        buffer = io.BytesIO()
        np.savez(buffer, outputs=result.outputs, labels=result.labels, rows=result.rows)
        write_bytes_atomic(cache_file, buffer.getvalue())
    return result


# ------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pneumo_utils.shards",
        description="Write a data set (Kermany folders or the NIH table) into TFRecord shards "
                    "with a manifest, or verify a shards folder.",
    )
    parser.add_argument("--data-root", help="Kermany data root, or NIH folder / labels CSV")
    parser.add_argument("--out", required=True, help="shards folder (created; reruns resume)")
    parser.add_argument("--kind", choices=("auto", "kermany", "nih"), default="auto")
    parser.add_argument("--image-size", type=int, default=224,
                        help="stored image side in px; 0 keeps the original files (default 224)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpeg", dest="image_format")
    parser.add_argument("--shard-mb", type=float, default=100.0, help="target shard size (MB)")
    parser.add_argument("--min-shards", type=int, default=8,
                        help="at least this many shards per split, for up to that many workers")
    parser.add_argument("--finding", default="Pneumonia", help="NIH positive finding")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                        help="NIH: downsample normals to the positives (default on)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="NIH only")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=None, help="encoding threads")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard of --out against the manifest and exit")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            manifest = verify_shards(args.out)
            print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['images']} images, "
                  "all match the manifest")
            return 0
        if not args.data_root:
            parser.error("--data-root is required to write shards")
        index, rule = load_index(args.data_root, args.kind, args.finding, args.balance,
                                 args.val_fraction, args.test_fraction, args.seed)
        root = Path(args.data_root).expanduser()
        manifest = write_shards(index, args.out, data_root=root.parent if root.is_file() else root,
                                image_size=args.image_size, image_format=args.image_format,
                                shard_mb=args.shard_mb, min_shards=args.min_shards,
                                split_rule=rule, workers=args.workers)
    except (OSError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except Exception as exc:  # TensorFlow's OpError (DataLossError...) is not a ValueError
        if type(exc).__module__.startswith("tensorflow"):
            print(f"error: {args.out}: " + " ".join(str(exc).split()), file=sys.stderr)
            return 2
        raise
    for split, counts in manifest["counts"].items():
        print(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
