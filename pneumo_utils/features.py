"""Frozen-backbone feature cache.

With a frozen base and no augmentation, every epoch of ``model.fit`` over images repeats the
same backbone forward pass. Computing the pooled features once and training the head on them
gives the same model (the head sees identical inputs; see ``pneumo_utils.bench``) at a small
fraction of the time. Features are stored on disk under a *content key* built from the
backbone's weights, the image size, and the exact file list (path, size, modification time),
so changing any of those recomputes instead of silently reusing stale features.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from pneumo_utils.data import image_dataset
from pneumo_utils.models import pooled_features_model

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


def cache_key(extractor: keras.Model, paths: list[str]) -> str:
    """Content key for the features of ``paths`` under ``extractor`` (image size included)."""
    image_size = extractor.inputs[0].shape[1]
    parts = (weights_fingerprint(extractor), files_fingerprint(paths), str(image_size))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def extract_features(
    model: keras.Model,
    paths: list[str],
    batch_size: int = 32,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    verbose: bool = True,
) -> np.ndarray:
    """Pooled backbone features of ``paths``, ``(n_images, channels)`` float32, cached.

    ``model`` is a classifier from :mod:`pneumo_utils.models` (or any model with a
    ``head_gap`` layer); its layers up to the pooling are run once per image. With
    ``cache_dir=None`` nothing is read or written. The cache file is written through a
    temporary file and a rename, so an interrupted run leaves no half-written cache.
    """
    extractor = pooled_features_model(model)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{model.name}-{cache_key(extractor, paths)}.npy"
        if cache_file.is_file():
            features = np.load(cache_file)
            if features.shape[0] == len(paths):
                if verbose:
                    print(f"features: loaded {features.shape} from cache {cache_file}")
                return features
    image_size = int(extractor.inputs[0].shape[1])
    dataset = image_dataset(paths, image_size=image_size, batch_size=batch_size, cache=False)
    start = time.perf_counter()
    features = extractor.predict(dataset, verbose=0).astype(np.float32)
    seconds = time.perf_counter() - start
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npy", dir=cache_file.parent, prefix=".partial-")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, features)
        os.replace(tmp, cache_file)
        if verbose:
            print(f"features: computed {features.shape} in {seconds:.0f} s "
                  f"({len(paths) / seconds:.1f} images/s), cached in {cache_file}")
    return features
