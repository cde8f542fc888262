"""Writing an index's images into TFRecord shards with a manifest (the folder layout is in
:mod:`pneumo_utils.scale.shard_manifest`).

At the scale of the full NIH set (112,120 PNGs, about 45 GB) reading one file per image
through Python is the bottleneck, and several hosts cannot each read every file. Shards fix
both: every image is decoded once, resized and re-encoded (JPEG by default) and written with
its label, patient, split, index row and original path into ``SPLIT-NNNNN-of-MMMMM.tfrecord``
files of about ``shard_mb`` MB each; :mod:`pneumo_utils.scale.shard_reader` streams them.

Writing is resumable: each shard is written under a temporary name and renamed when
complete, and recorded in the manifest; a rerun with the same index and settings skips
every shard whose file matches its recorded checksum. Images that cannot be read are left
out and reported once, as :func:`pneumo_utils.data.kermany.load_kermany` does.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pneumo_utils.data.datasets import BadImagesWarning
from pneumo_utils.data.images import read_image, read_resized
from pneumo_utils.data.kermany import load_kermany
from pneumo_utils.data.nih import find_labels_csv, load_nih
from pneumo_utils.data.pixels import ImageReadError
from pneumo_utils.files import atomic_path, file_digest, write_bytes_atomic, write_json_atomic
from pneumo_utils.scale.shard_manifest import (
    _SAFE_SPLIT,
    FORMAT,
    IMAGE_FORMATS,
    INDEX_FILE,
    MANIFEST,
    SPLIT_ORDER,
    CorruptShardError,
    ShardsMismatchError,
    check_manifest,
    count_classes,
    labels_digest,
)
from pneumo_utils.sidecar import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

JPEG_QUALITY = 95
_SAMPLE_IMAGES = 16


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

    ``kind`` ``"kermany"``: :func:`~pneumo_utils.data.kermany.load_kermany` and a patient-grouped
    validation split carved from train (:func:`pneumo_utils.data.splits.grouped_split`), test as
    published. ``"nih"``: :func:`~pneumo_utils.data.nih.load_nih` (normal vs ``finding``,
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
    if image_size != 0 and not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be 0 (original files) or {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} px "
                         f"(the model input range), got {image_size!r}")
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
                if entry is not None and (out / name).is_file() and file_digest(out / name) == entry["sha256"]:
                    reused += 1
                    continue
                part = rows.iloc[lo:hi]
                bad: list[dict] = []
                labels: list[int] = []

                def records(part=part, bad=bad, labels=labels, name=name):
                    images = pool.map(lambda p: _try_encode(p, image_size, image_format), part["path"])
                    for image, row in zip(images, part.itertuples(index=False), strict=True):
                        if isinstance(image, str):
                            bad.append({"path": row.path, "reason": image, "shard": name})
                        else:
                            labels.append(int(row.label))
                            yield _example(tf, image, row)

                entry = _write_shard(tf, out / name, records(), split, lo, hi)
                manifest["shards"][name] = {**entry, "labels_sha256": labels_digest(labels)}
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
    manifest["counts"] = count_classes(written)
    manifest["images"] = int(len(written))
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    manifest["reused_shards"] = reused
    written = written.assign(shard=[_shard_of(manifest["plan"], s, p) for s, p in
                                    zip(written["split"], written["position"], strict=True)])
    csv = written[["row", "key", "label", "patient", "split", "source", "shard"]].to_csv(index=False)
    write_bytes_atomic(out / INDEX_FILE, csv.encode())
    manifest["index_csv_sha256"] = hashlib.sha256(csv.encode()).hexdigest()
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
    root = Path(os.path.abspath(Path(data_root).expanduser()) if data_root is not None else
                os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) else os.getcwd())
    if root.is_file():
        root = root.parent
    table["row"] = np.arange(len(table), dtype=np.int64)
    table["position"] = table.groupby("split").cumcount()
    table["key"] = [os.path.relpath(os.path.abspath(p), root) for p in paths]
    table["label"] = table["label"].astype(np.int64)
    table["patient"] = table["patient"].astype(str)
    table.attrs["data_root"] = root.resolve()  # absolute: the manifest is read from anywhere
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
        digest = file_digest(tmp)
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
