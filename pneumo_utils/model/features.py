"""Frozen-backbone feature cache.

With a frozen base and no augmentation, every epoch of ``model.fit`` over images repeats the
same backbone forward pass. Computing the pooled features once and training the head on them
gives the same model (the head sees identical inputs; see ``benchmarks/bench.py``) at a small
fraction of the time. Features are stored on disk under a *content key* built from the
backbone's weights, the image size, the exact file list (path, size, modification time) and
the input pipeline's decoder (:data:`pneumo_utils.data.pipelines.DECODER`), so changing any of
those recomputes instead of silently reusing stale features. Each cache file's name also
carries a checksum of its contents (``NAME-KEY-SHA.npy``): a file that was truncated, zeroed
or otherwise changed on disk is detected on load, named in a warning, deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumo_utils.data.frames import other_class_references, swap_frame
from pneumo_utils.data.pipelines import DECODER, image_dataset
from pneumo_utils.files import write_bytes_atomic
from pneumo_utils.model.backbones import pooled_features_model

DEFAULT_CACHE_DIR = ".cache/pneumo/features"


def weights_fingerprint(model: keras.Model) -> str:
    """SHA-256 over a model's layers (class, name) and weights (path, shape, values), in order.

    The model's own auto-generated name is left out, so rebuilding the same extractor gives
    the same fingerprint.
    """
    digest = hashlib.sha256()
    for layer in model.layers:
        digest.update(f"{type(layer).__name__}:{layer.name};".encode())
    for weight in model.weights:
        digest.update(f"{weight.path}{tuple(weight.shape)}".encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def files_fingerprint(paths: list[str]) -> str:
    """SHA-256 over the file list in order, with each file's size and modification time."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(
    weights_hash: str,
    image_size: int,
    paths: list[str],
    frames: list[str] | None = None,
    border: float = 0.0,
) -> str:
    """Content key for the features of ``paths`` under one extractor, image size and decoder
    (and, for frame-swapped views, the frame sources and the frame's width)."""
    parts = [weights_hash, files_fingerprint(paths), str(image_size), DECODER]
    if frames is not None:
        parts += [files_fingerprint(frames), f"border={border}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def extract_features(
    model: keras.Model,
    paths: list[str],
    batch_size: int = 32,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    verbose: bool = True,
) -> np.ndarray:
    """Pooled backbone features of ``paths``, ``(n_images, channels)`` float32, cached.

    See :func:`extract_split_features`, which does the same for several file lists at once.
    """
    return extract_split_features(model, {"images": paths}, batch_size, cache_dir, verbose)["images"]


def extract_split_features(
    model: keras.Model,
    paths: Mapping[str, list[str]],
    batch_size: int = 32,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    verbose: bool = True,
    frame_from: Mapping[str, list[str]] | None = None,
    border: float = 0.12,
) -> dict[str, np.ndarray]:
    """Pooled backbone features per split, ``{split: (n_images, channels) float32}``, cached.

    ``model`` is a classifier from :mod:`pneumo_utils.model.backbones` (or any model with a
    ``head_gap`` layer); its layers up to the pooling run once per image, in one pass over
    every file list not found in the cache (one extractor, traced once), with Keras' closing
    line and a summary when ``verbose``. Each list is cached under its own content key, so a split that did
    not change is reused even when another did. With ``cache_dir=None`` nothing is read or
    written. Cache files are written through a temporary file and a rename, so an
    interrupted run leaves no half-written cache; a cache file that fails its checksum is
    deleted and recomputed (with a warning naming it).

    ``frame_from`` makes *frame-swapped views* (:func:`pneumo_utils.data.frames.swap_frame`): for a
    split named in it, image ``i`` keeps its centre but its outer frame (``border`` of each side) is
    taken from ``frame_from[split][i]``, e.g. an image of the other class. Training a head on
    such views as well as on the clean images makes the frame useless for telling the
    classes apart, so the model must use the centre.
    """
    frame_from = dict(frame_from or {})
    unknown = set(frame_from) - set(paths)
    if unknown:
        raise ValueError(f"frame_from names splits not in paths: {sorted(unknown)}")
    for split, frames in frame_from.items():
        if len(frames) != len(paths[split]):
            raise ValueError(f"frame_from[{split!r}] has {len(frames)} images for "
                             f"{len(paths[split])} in paths[{split!r}]")
    extractor = pooled_features_model(model)
    image_size = int(extractor.inputs[0].shape[1])
    weights_hash = weights_fingerprint(extractor) if cache_dir is not None else ""
    out: dict[str, np.ndarray] = {}
    todo: dict[str, Path | None] = {}
    for split, split_paths in paths.items():
        cache_file = None
        if cache_dir is not None:
            key = cache_key(weights_hash, image_size, split_paths, frame_from.get(split), border)
            cache_file = Path(cache_dir) / f"{model.name}-{key}.npy"
            cached = _load_cached(cache_file, len(split_paths))
            if cached is not None:
                out[split], found = cached
                if verbose:
                    print(f"features: {split} {out[split].shape} loaded from cache {found}")
                continue
        todo[split] = cache_file
    plain = {split: file for split, file in todo.items() if split not in frame_from}
    framed = {split: file for split, file in todo.items() if split in frame_from}
    for group in (plain, framed):
        if not group:
            continue
        all_paths = [p for split in group for p in paths[split]]
        dataset = image_dataset(all_paths, image_size=image_size, batch_size=batch_size, cache=False)
        if group is framed:
            frames = [p for split in group for p in frame_from[split]]
            frame_images = image_dataset(frames, image_size=image_size, batch_size=batch_size, cache=False)
            dataset = tf.data.Dataset.zip((dataset, frame_images)).map(
                lambda x, f: swap_frame(x, f, border), num_parallel_calls=tf.data.AUTOTUNE)
        start = time.perf_counter()
        features = extractor.predict(dataset, verbose=2 if verbose else 0).astype(np.float32)
        seconds = time.perf_counter() - start
        if verbose:
            print(f"features: computed {features.shape} for {', '.join(group)} in {seconds:.0f} s "
                  f"({len(all_paths) / max(seconds, 1e-9):.1f} images/s)")
        offset = 0
        for split, cache_file in group.items():
            out[split] = features[offset: offset + len(paths[split])]
            offset += len(paths[split])
            if cache_file is not None:
                _save_atomic(cache_file, out[split])
    return {split: out[split] for split in paths}


def _checksum(features: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the array's shape, dtype and bytes."""
    digest = hashlib.sha256(f"{features.shape}{features.dtype}".encode())
    digest.update(np.ascontiguousarray(features).tobytes())
    return digest.hexdigest()[:16]


def _load_cached(cache_file: Path, n_rows: int) -> tuple[np.ndarray, Path] | None:
    """The verified features stored for ``cache_file``'s key and their file, or ``None``.

    The file is ``STEM-SHA.npy``; one that cannot be read, has the wrong number of rows or
    does not match its checksum is named in a warning and deleted, so it is recomputed.
    """
    for candidate in sorted(cache_file.parent.glob(f"{cache_file.stem}-*.npy")):
        expected = candidate.stem.rsplit("-", 1)[-1]
        try:
            problem = _header_problem(candidate, n_rows)
            if problem is None:
                features = np.load(candidate, allow_pickle=False)
                if _checksum(features) != expected:
                    problem = "its contents do not match the checksum in its name"
        except (OSError, ValueError, EOFError) as exc:
            problem = f"cannot be read ({' '.join(str(exc).split())})"
        if problem is None:
            return features, candidate
        warnings.warn(
            f"feature cache file {candidate} {problem}; deleted, the features are recomputed",
            UserWarning,
            stacklevel=3,
        )
        candidate.unlink(missing_ok=True)
    return None


def _header_problem(candidate: Path, n_rows: int) -> str | None:
    """What is wrong with a cache file's ``.npy`` header (``None`` if nothing), read before
    the array: a damaged header can declare a (2e9, 1024) array, which ``np.load`` would try
    to allocate (7.45 TiB) before finding the file short."""
    with open(candidate, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(handle)
        data_bytes = candidate.stat().st_size - handle.tell()
    if len(shape) != 2 or shape[0] != n_rows or dtype.hasobject:
        return f"holds {shape} {dtype}, expected {n_rows} rows"
    if shape[0] * shape[1] * dtype.itemsize != data_bytes:
        return (f"declares {shape} {dtype} ({shape[0] * shape[1] * dtype.itemsize:,} bytes) but "
                f"holds {data_bytes:,} bytes")
    return None


def _save_atomic(cache_file: Path, features: np.ndarray) -> None:
    """``np.save`` to ``STEM-SHA.npy`` with :func:`pneumo_utils.files.write_bytes_atomic`, so no
    partial file survives a failure (the array, a few MB, is serialised in memory first)."""
    buffer = io.BytesIO()
    np.save(buffer, features)
    write_bytes_atomic(cache_file.with_name(f"{cache_file.stem}-{_checksum(features)}.npy"),
                       buffer.getvalue())


def extract_with_frame_swaps(
    model: keras.Model,
    paths: Mapping[str, list[str]],
    labels: Mapping[str, np.ndarray],
    frame_swap: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    verbose: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Features per split, plus the head's training set with frame-swapped copies.

    With ``frame_swap``, every training image gets a second copy whose outer frame comes from
    a random training image of the other class (``seed``; see :func:`extract_split_features`
    and :mod:`pneumo_utils.data.frames`), so the frame says nothing about the label across the
    two copies. Returns ``(features, x_train, y_train)``: ``features`` maps each split of
    ``paths`` to ``(n, channels)``; ``x_train``/``y_train`` stack the clean training features
    and, with ``frame_swap``, their swapped copies (labels repeated).
    """
    views = {}
    if frame_swap:
        other = other_class_references(labels["train"], labels["train"], seed=seed)
        views = {"train_swapped": [paths["train"][i] for i in other]}
    feats = extract_split_features(model, {**paths, **{v: paths["train"] for v in views}},
                                   batch_size=batch_size, cache_dir=cache_dir, verbose=verbose,
                                   frame_from=views)
    x_train = np.concatenate([feats["train"], *(feats[v] for v in views)])
    y_train = np.concatenate([np.asarray(labels["train"])] * (1 + len(views)))
    return {split: feats[split] for split in paths}, x_train, y_train
