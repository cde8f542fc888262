"""Acquisition-shift stress test: how a model holds up on perturbed copies of its images.

Why: a patient-grouped hold-out of the training collection says little about images from
another collection. On the Kermany data, models that score AUC 0.997 on such a hold-out drop
to about 0.95 on the separately collected official test split, mostly by calling normal
children's X-rays pneumonia. The official test images must not guide any choice, so this
module gives a proxy that can be computed on *validation* data: the same images as another
X-ray machine or protocol might render them (darker or brighter exposure, less contrast, a
softer detector, a different field of view, more noise). A model whose AUC and error rates
move little under these perturbations is less tied to one machine's look.

It is a proxy, not a substitute for an external test set: real shifts also change the
patients, the disease mix and the labelling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import keras
import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split

from pneumo_utils.data import load_images


def _gamma(power: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: 255.0 * (x / 255.0) ** power


def _low_contrast(x: np.ndarray) -> np.ndarray:
    mean = x.mean()
    return mean + 0.7 * (x - mean)


def _blur(x: np.ndarray) -> np.ndarray:
    sigma = 1.5 * x.shape[0] / 224  # 1.5 px at 224 px
    return cv2.GaussianBlur(x, (0, 0), sigma)


def _zoom_out(x: np.ndarray) -> np.ndarray:
    side = x.shape[0]
    small = int(round(side * 0.85))
    out = np.zeros_like(x)
    offset = (side - small) // 2
    out[offset: offset + small, offset: offset + small] = cv2.resize(
        x, (small, small), interpolation=cv2.INTER_AREA
    )
    return out


def _zoom_in(x: np.ndarray) -> np.ndarray:
    side = x.shape[0]
    crop = int(round(side * 0.85))
    offset = (side - crop) // 2
    return cv2.resize(x[offset: offset + crop, offset: offset + crop], (side, side),
                      interpolation=cv2.INTER_LINEAR)


def _noise(x: np.ndarray) -> np.ndarray:
    return x + np.random.default_rng(0).normal(0.0, 8.0, x.shape)


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma_dark": _gamma(1.5),
    "gamma_bright": _gamma(0.67),
    "low_contrast": _low_contrast,
    "blur": _blur,
    "zoom_out": _zoom_out,
    "zoom_in": _zoom_in,
    "noise": _noise,
}
"""Each maps one ``(h, w, 3)`` float image in 0-255 to its perturbed copy (before clipping):
gamma 1.5 / 0.67 (under- / over-exposure), contrast x0.7 about the mean, Gaussian blur of
1.5 px at 224 px, zoom out to 85% inside a black border (wider collimation), zoom in on the
central 85%, and Gaussian noise of 8 grey levels (seeded)."""


def perturb(image: np.ndarray, kind: str) -> np.ndarray:
    """One perturbed copy of ``image`` (``(h, w, 3)`` in 0-255), float32 clipped to 0-255."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
    return np.clip(PERTURBATIONS[kind](np.asarray(image, dtype=np.float32)), 0, 255).astype(np.float32)


def perturbed_batches(images: np.ndarray, kinds: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{"clean": images, kind: perturbed images, ...}``, each ``(n, h, w, 3)`` float32."""
    kinds = list(PERTURBATIONS) if kinds is None else list(kinds)
    out = {"clean": np.asarray(images, dtype=np.float32)}
    for kind in kinds:
        out[kind] = np.stack([perturb(image, kind) for image in images])
    return out


def shift_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, accuracy, false-positive rate (normals called pneumonia) and false-negative rate."""
    y_true = np.asarray(y_true).astype(int)
    pred = np.asarray(proba) >= threshold
    return {
        "auc": float(skm.roc_auc_score(y_true, proba)),
        "accuracy": float(np.mean(pred == y_true)),
        "fpr": float(np.mean(pred[y_true == 0])),
        "fnr": float(np.mean(~pred[y_true == 1])),
    }


def stress_test(
    model: keras.Model,
    paths: Sequence[str],
    labels: np.ndarray,
    threshold: float = 0.5,
    kinds: Sequence[str] | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Metrics of ``model`` on clean and perturbed copies of ``paths`` at a fixed ``threshold``.

    Returns one row per condition (``clean`` first, then each of ``kinds``, default all of
    :data:`PERTURBATIONS`) with ``auc``, ``accuracy``, ``fpr`` and ``fnr``, and a last row
    ``mean shift`` averaging the perturbed rows. Costs one forward pass per image and
    condition; ``max_images`` scores a class-stratified random sample (``seed``) instead of
    every image. Use the threshold chosen on clean validation data: the test is whether it
    still holds.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("the stress test needs images of both classes")
    if max_images is not None and max_images < len(paths):
        paths, _, labels, _ = train_test_split(
            list(paths), labels, train_size=max_images, stratify=labels, random_state=seed
        )
    size = int(model.inputs[0].shape[1])
    batches = perturbed_batches(load_images(list(paths), size), kinds)
    rows = {
        name: shift_metrics(labels, model.predict(x, batch_size=batch_size, verbose=0).reshape(-1),
                            threshold)
        for name, x in batches.items()
    }
    table = pd.DataFrame(rows).T
    table.loc["mean shift"] = table.drop(index="clean").mean()
    return table
