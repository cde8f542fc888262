"""The input check: how far an image lies from the chest X-rays a model was trained on.

A classifier answers every input, a holiday photo included, with a confident class. The check
learns what the training images look like, in two views, and scores each new image by how far
it lies from them; beyond a limit chosen on validation images in either view, the image is
*not assessed* (``predict`` gives no class):

- ``features``: the model's own global-average-pooled backbone features (layer ``head_gap``,
  the head's input; ``(n, D)``, D = 1280 for MobileNetV2). They tell photographs, drawings,
  blank and noise images and rotated X-rays from chest X-rays.
- ``thumbnail``: the grey image the model sees, shrunk to 8 x 8 block means (64 numbers). It
  catches what a fine-tuned network's features can miss: inverted X-rays (a bright background,
  dark lungs), which the backbone may map near real ones. It needs no model, so exports
  apply it without TensorFlow.

Each view's training distribution is modelled as a Gaussian whose covariance is probabilistic
PCA's (Tipping and Bishop 1999): ``k`` principal directions with their own variances plus one
shared variance for the rest. It is a regularised covariance, like the Ledoit-Wolf estimate
of Mahalanobis-distance detectors (Lee et al. 2018), that fits in the sidecar (mean, ``k``
directions and ``k + 1`` variances instead of a ``D x D`` matrix). A view's score is the
squared Mahalanobis distance divided by the dimension: about 1 for a training-like image.
Each limit is a quantile of the validation images' scores (held out from the fit), recorded
with its rule as the decision threshold is.

The check also keeps the whitened feature coordinates of up to :data:`MAX_REFERENCE`
validation images, the reference sample of the site-shift test
(:mod:`pneumo_utils.evaluation.site_shift`). Scoring is NumPy only; the record travels in the
sidecar (``input_check``), and a model without one still predicts and says so.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from pneumo_utils.sidecar import ModelFileError

FEATURE_LAYER = "head_gap"
"""The layer whose output the ``features`` view models: the pooled features the head reads."""

KIND = "ppca-mahalanobis"
VIEWS = ("features", "thumbnail")
THUMBNAIL_SIDE = 8
DEFAULT_COMPONENTS = {"features": 32, "thumbnail": 8}
"""Principal directions per view (chosen on validation and hold-out images of notebook 03's
model, RESULTS.md): more directions absorb what tells an inverted X-ray apart."""

DEFAULT_QUANTILE = 0.995
"""Each view's limit is this quantile of the validation scores, so about 1% of validation
images are beyond one limit or the other."""

MAX_FIT_IMAGES = 1500
"""Most training images the check is fitted on (a seeded sample): 32 directions need far
fewer, and the features of a fine-tuned backbone cannot be cached."""

MAX_REFERENCE = 300
"""Most validation images kept (whitened) as the site-shift test's reference sample."""

FEW_VALIDATION = 50
"""Below this many validation images a limit is called rough in its rule."""

MAX_WIDTH = 4096
"""Widest view a sidecar's check may declare (ResNet50 pools 2048 channels)."""


@dataclass(frozen=True)
class Looks:
    """What the check sees of ``n`` images: pooled ``features`` ``(n, D)`` (``None`` where no
    Keras model ran, as for exports) and grey ``thumbnails`` ``(n, 64)``."""

    features: np.ndarray | None
    thumbnails: np.ndarray

    def __len__(self) -> int:
        return len(self.thumbnails)

    def of(self, view: str) -> np.ndarray | None:
        return self.features if view == "features" else self.thumbnails


def thumbnails(images: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Grey ``side x side`` block means of model inputs ``(n, s, s, 3)`` in 0-255:
    ``(n, side * side)``. Exact block means when ``s`` is a multiple of ``side`` (every pneumo
    image size is), OpenCV's area resize otherwise, as the Keras graph of :func:`feature_model`
    computes them."""
    grey = np.asarray(images, dtype=np.float64).mean(axis=-1)
    n, s = grey.shape[0], grey.shape[1]
    if s % side == 0:
        return grey.reshape(n, side, s // side, side, s // side).mean(axis=(2, 4)).reshape(n, -1)
    import cv2

    return np.stack([cv2.resize(g, (side, side), interpolation=cv2.INTER_AREA) for g in grey]).reshape(n, -1)


@dataclass(frozen=True)
class Gaussian:
    """Probabilistic PCA of one view: ``mean`` ``(D,)``, ``components`` ``(k, D)``
    orthonormal rows, their ``variances`` ``(k,)`` and ``noise_variance`` for the rest."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    noise_variance: float

    @classmethod
    def fit(cls, x: np.ndarray, components: int, seed: int = 0) -> Gaussian:
        from sklearn.decomposition import PCA

        x = np.asarray(x, dtype=np.float64)
        k = int(min(components, len(x) - 1, x.shape[1] - 1))
        if k < 1:
            raise ValueError(f"an input check needs at least 2 training images and 2 values per view, got {x.shape}")
        pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)
        floor = 1e-6 * max(float(pca.explained_variance_.max()), 1e-12)
        return cls(pca.mean_, pca.components_, np.maximum(pca.explained_variance_, floor),
                   max(float(pca.noise_variance_), floor))

    def _parts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"the input check expects {self.mean.shape[0]} values per image, got {x.shape[1]}")
        x = x - self.mean
        z = x @ self.components.T
        return z, np.maximum((x * x).sum(axis=1) - (z * z).sum(axis=1), 0.0)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per dimension, ``(n,)``: about 1 for training-like rows."""
        z, residual = self._parts(x)
        return ((z * z / self.variances).sum(axis=1) + residual / self.noise_variance) / self.mean.shape[0]

    def coordinates(self, x: np.ndarray) -> np.ndarray:
        """Whitened coordinates ``(n, k + 1)``: principal components over their standard
        deviations, and the residual's size in units of its expected size."""
        z, residual = self._parts(x)
        rest = max(self.mean.shape[0] - len(self.variances), 1)
        return np.column_stack([z / np.sqrt(self.variances), np.sqrt(residual / (self.noise_variance * rest))])

    def to_dict(self) -> dict:
        return {"width": int(self.mean.shape[0]), "components": int(len(self.variances)),
                "noise_variance": float(self.noise_variance),
                "arrays": {name: _encode(getattr(self, name)) for name in ("mean", "components", "variances")}}

    @classmethod
    def from_dict(cls, record: object, bad) -> Gaussian:
        if not isinstance(record, dict):
            raise bad("has a view that is not an object")
        d, k = record.get("width"), record.get("components")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d, k)) or not 1 <= k < d <= MAX_WIDTH:
            raise bad(f"declares a view of width {d!r} with {k!r} components (expected 1 <= components < "
                      f"width <= {MAX_WIDTH})")
        arrays = record.get("arrays")
        if not isinstance(arrays, dict):
            raise bad("has a view without arrays")
        values = {name: _decode(arrays.get(name), shape, bad)
                  for name, shape in (("mean", (d,)), ("components", (k, d)), ("variances", (k,)))}
        noise = _positive(record.get("noise_variance"), "noise_variance", bad)
        if (values["variances"] <= 0).any():
            raise bad("has variances that are not positive")
        return cls(values["mean"], values["components"], values["variances"], noise)


@dataclass(frozen=True)
class InputCheck:
    """A fitted input check (see the module docstring): ``views`` maps ``features`` and
    ``thumbnail`` to their :class:`Gaussian` and ``limits`` to the largest score still
    assessed; ``limit_rule`` says how the limits were chosen, ``reference`` ``(m, k + 1)``
    holds whitened validation feature coordinates, ``fitted_on`` says which images, and
    ``validation`` summarises the validation scores (images, share flagged)."""

    views: dict
    limits: dict
    limit_rule: str
    reference: np.ndarray
    fitted_on: str
    validation: dict

    @property
    def feature_width(self) -> int:
        return int(self.views["features"].mean.shape[0])

    def scores(self, looks: Looks) -> dict[str, np.ndarray]:
        """Each available view's scores ``(n,)``."""
        return {view: self.views[view].scores(looks.of(view)) for view in VIEWS if looks.of(view) is not None}

    def ratios(self, looks: Looks) -> np.ndarray:
        """``(n,)``: each image's largest score over its view's limit (beyond a limit above 1)."""
        return np.max([s / self.limits[view] for view, s in self.scores(looks).items()], axis=0)

    def flagged(self, looks: Looks) -> np.ndarray:
        """``(n,)`` bools: images beyond the limit of any available view (not assessed)."""
        return self.ratios(looks) > 1.0

    def describe(self, looks: Looks) -> list[dict]:
        """Per image, the view furthest beyond (or closest to) its limit: ``view``, ``score``,
        ``limit``, ``beyond_limit``, and ``views`` checked."""
        scores = self.scores(looks)
        rows = []
        for i in range(len(looks)):
            view = max(scores, key=lambda v: scores[v][i] / self.limits[v])
            rows.append({"view": view, "score": float(scores[view][i]), "limit": float(self.limits[view]),
                         "beyond_limit": bool(scores[view][i] > self.limits[view]), "views": list(scores)})
        return rows

    def coordinates(self, features: np.ndarray) -> np.ndarray:
        """Whitened feature coordinates (the site-shift test's space)."""
        return self.views["features"].coordinates(features)

    def to_dict(self) -> dict:
        """The sidecar record (arrays as base64 little-endian float32)."""
        return {
            "kind": KIND,
            "layer": FEATURE_LAYER,
            "thumbnail_side": THUMBNAIL_SIDE,
            "views": {view: {**self.views[view].to_dict(), "limit": float(self.limits[view])} for view in VIEWS},
            "limit_rule": self.limit_rule,
            "fitted_on": self.fitted_on,
            "validation": self.validation,
            "reference": _encode(self.reference),
        }

    @classmethod
    def from_dict(cls, record: object, source: str = "sidecar") -> InputCheck:
        """The check a sidecar's ``input_check`` record describes, or :class:`ModelFileError`
        naming what is wrong (a wrong kind, shapes that disagree, values that are not finite)."""
        def bad(what: str) -> ModelFileError:
            return ModelFileError(f"{source}: field input_check {what}; save the model again "
                                  "with its input check, or remove the field to predict without one")

        if not isinstance(record, dict) or record.get("kind") != KIND:
            raise bad(f"is not a {KIND} record")
        views = record.get("views")
        if not isinstance(views, dict) or set(views) != set(VIEWS):
            raise bad(f"must have the views {', '.join(VIEWS)}")
        if record.get("thumbnail_side") != THUMBNAIL_SIDE:
            raise bad(f"has thumbnail_side {record.get('thumbnail_side')!r}, expected {THUMBNAIL_SIDE}")
        gaussians = {view: Gaussian.from_dict(views[view], bad) for view in VIEWS}
        if gaussians["thumbnail"].mean.shape[0] != THUMBNAIL_SIDE ** 2:
            raise bad(f"has a thumbnail view of width {gaussians['thumbnail'].mean.shape[0]}, expected "
                      f"{THUMBNAIL_SIDE ** 2}")
        limits = {view: _positive(views[view].get("limit"), f"{view} limit", bad) for view in VIEWS}
        k = len(gaussians["features"].variances)
        reference = _decode(record.get("reference"), (-1, k + 1), bad)
        return cls(gaussians, limits, str(record.get("limit_rule", "")), reference,
                   str(record.get("fitted_on", "")), dict(record.get("validation") or {}))


def _positive(value: object, name: str, bad) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise bad(f"has {name} {value!r}, expected a positive number")
    return float(value)


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.asarray(array, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: object, shape: tuple[int, ...], bad) -> np.ndarray:
    if not isinstance(text, str):
        raise bad("is missing an array")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise bad("holds an array that is not base64") from None
    if len(raw) % 4:
        raise bad("holds an array of a broken length")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    row = math.prod(shape[1:]) if shape[0] < 0 else math.prod(shape)
    if (shape[0] >= 0 and len(values) != row) or (shape[0] < 0 and len(values) % row):
        raise bad(f"holds an array of {len(values)} values that does not fit shape {shape}")
    if not np.isfinite(values).all():
        raise bad("holds values that are not finite")
    return values.reshape(shape)


def feature_model(model):
    """A Keras model giving ``[output, pooled features, thumbnails]`` of ``model`` in one
    forward pass, or ``None`` when neither ``model`` nor any member of it has a
    :data:`FEATURE_LAYER` (a model built elsewhere): such a model has no input check.

    An ensemble (:func:`pneumo_utils.model.ensemble.average`) is seen through its first member
    with that layer: its pooled features, on the image resized to that member's input as the
    ensemble resizes it, so the ensemble's check asks whether an image looks like the images
    that member was trained on.
    """
    import keras

    from pneumo_utils.model.ensemble import members_of

    image = model.inputs[0]
    size = int(image.shape[1])
    try:
        pooled = model.get_layer(FEATURE_LAYER).output
    except ValueError:
        seen = next((m for m in members_of(model) if FEATURE_LAYER in {layer.name for layer in m.layers}), None)
        if seen is None:
            return None
        side = int(seen.inputs[0].shape[1] or size)  # a free-size member: the ensemble's size
        resized = image if side == size else keras.layers.Resizing(side, side, name="input_check_resize")(image)
        pooled = keras.Model(seen.inputs, seen.get_layer(FEATURE_LAYER).output,
                             name="input_check_features")(resized)
    grey = keras.ops.mean(image, axis=-1, keepdims=True)
    if size % THUMBNAIL_SIDE == 0:
        small = keras.layers.AveragePooling2D(pool_size=size // THUMBNAIL_SIDE, name="input_check_thumbnail")(grey)
    else:
        small = keras.layers.Resizing(THUMBNAIL_SIDE, THUMBNAIL_SIDE, interpolation="area",
                                      name="input_check_thumbnail")(grey)
    flat = keras.layers.Flatten(name="input_check_flat")(small)
    return keras.Model(model.inputs, [model.outputs[0], pooled, flat])


def predict_with_looks(model, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, Looks | None]:
    """Probabilities (as :func:`pneumo_utils.model.inference.predict_paths` gives them: ``(n,)``
    or ``(n, K)``) and what the check sees of image files, in one forward pass; ``None`` looks
    for a model without :data:`FEATURE_LAYER`."""
    from pneumo_utils.data.pipelines import image_dataset
    from pneumo_utils.model.inference import predict_paths

    both = feature_model(model)
    if both is None:
        return predict_paths(model, list(paths), batch_size), None
    size = int(model.inputs[0].shape[1])
    dataset = image_dataset(list(paths), image_size=size, batch_size=batch_size, cache=False)
    proba, features, small = both.predict(dataset, verbose=0)
    proba = np.asarray(proba)
    looks = Looks(np.asarray(features, dtype=np.float64), np.asarray(small, dtype=np.float64))
    return (proba.reshape(-1) if proba.shape[-1] == 1 else proba), looks


def looks_of(model, paths: list[str], batch_size: int = 32) -> Looks:
    """What the check sees of image files (decoded as in training)."""
    _, looks = predict_with_looks(model, paths, batch_size)
    if looks is None:
        raise ValueError(f"model {model.name} has no layer {FEATURE_LAYER!r}: it has no input check")
    return looks


def thumbnails_of(paths: list[str], image_size: int, batch_size: int = 64) -> np.ndarray:
    """The ``thumbnail`` view of image files ``(n, 64)``, decoded as in training, without
    running a model (for a frozen backbone whose features are cached)."""
    from pneumo_utils.data.pipelines import image_dataset

    dataset = image_dataset(list(paths), image_size=image_size, batch_size=batch_size, cache=False)
    return np.concatenate([thumbnails(batch.numpy()) for batch in dataset])


def fit(
    model,
    train_paths: list[str],
    val_paths: list[str],
    *,
    train_features: np.ndarray | None = None,
    val_features: np.ndarray | None = None,
    val_looks: Looks | None = None,
    components: dict | None = None,
    quantile: float = DEFAULT_QUANTILE,
    max_fit_images: int = MAX_FIT_IMAGES,
    batch_size: int = 32,
    seed: int = 0,
) -> InputCheck:
    """Fit the input check of ``model`` on (a seeded sample of up to ``max_fit_images``)
    training images and choose each view's limit as the ``quantile`` of the validation
    images' scores. Call it on the final weights, right before saving: the features are the
    model's own. A frozen backbone's cached pooled features (``train_features`` ``(n, D)``
    and ``val_features``, rows in the order of the paths) save the forward passes; only the
    thumbnails are then decoded. ``val_looks`` (:func:`predict_with_looks` of the validation
    images, computed with the final weights) saves the validation pass. ``components``
    overrides :data:`DEFAULT_COMPONENTS` per view.
    """
    train_paths, rows = list(train_paths), np.arange(len(train_paths))
    if len(train_paths) > max_fit_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(train_paths), max_fit_images, replace=False))
        train_paths = [train_paths[i] for i in rows]
    if train_features is not None and val_features is not None:
        size = int(model.inputs[0].shape[1])
        train = Looks(np.asarray(train_features, dtype=np.float64)[rows], thumbnails_of(train_paths, size))
        val = Looks(np.asarray(val_features, dtype=np.float64), thumbnails_of(list(val_paths), size))
    else:
        train = looks_of(model, train_paths, batch_size)
        val = val_looks if val_looks is not None else looks_of(model, list(val_paths), batch_size)
    return fit_looks(train, val, components=components, quantile=quantile, seed=seed)


def fit_looks(
    train: Looks,
    val: Looks,
    *,
    components: dict | None = None,
    quantile: float = DEFAULT_QUANTILE,
    seed: int = 0,
) -> InputCheck:
    """:func:`fit` on looks already computed: ``train`` fits each view's Gaussian, ``val``
    chooses the limits and gives the reference sample."""
    if not 0.5 <= quantile < 1:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile!r}")
    if len(val) < 2:
        raise ValueError(f"the input check's limits need at least 2 validation images, got {len(val)}")
    if train.features is None or val.features is None:
        raise ValueError("fitting an input check needs the model's pooled features")
    k = {**DEFAULT_COMPONENTS, **(components or {})}
    views = {view: Gaussian.fit(train.of(view), k[view], seed) for view in VIEWS}
    val_scores = {view: views[view].scores(val.of(view)) for view in VIEWS}
    limits = {view: float(np.quantile(s, quantile, method="higher")) for view, s in val_scores.items()}
    flagged = np.any([val_scores[v] > limits[v] for v in VIEWS], axis=0)
    keep = np.sort(np.random.default_rng(seed).choice(len(val), min(len(val), MAX_REFERENCE), replace=False))
    return InputCheck(
        views=views,
        limits=limits,
        limit_rule=(f"each view's limit is the {quantile:.1%} quantile of {len(val)} validation images' "
                    "scores (images the check was not fitted on)"
                    + (f"; only {len(val)} validation images: a rough limit" if len(val) < FEW_VALIDATION else "")),
        reference=views["features"].coordinates(val.features[keep]),
        fitted_on=f"{len(train)} training images",
        validation={"images": int(len(val)), "flagged": float(flagged.mean()), "quantile": quantile},
    )


def of(meta: dict, source: str = "sidecar") -> InputCheck | None:
    """The input check recorded in sidecar ``meta`` (``None`` when it has none)."""
    record = meta.get("input_check")
    return None if record is None else InputCheck.from_dict(record, source)
