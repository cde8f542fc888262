"""Shortcut audit and counterfactual cue tests, on validation images.

Why: a patient-grouped hold-out of the training collection rewards any cue that separates the
classes there, including cues that say nothing about lungs: on the Kermany training images,
NORMAL X-rays have darker borders and true-black backgrounds, and their grey-level histogram
alone predicts the label (see :func:`audit`). Such a model scores AUC 0.99+ on a same-source
hold-out and over-calls normals where the cue differs (the official Kermany test split). This
module measures that dependence with validation images only:

* :func:`audit` - how well trivial image statistics (border intensity, grey-level
  percentiles, mean and spread) predict the label. A high AUC means the data set carries a
  shortcut that any model may take.
* :func:`counterfactuals` / :func:`cue_test` - the same validation images with the cue
  swapped: each image gets the grey-level histogram of, or the outer frame of, an image of the
  *other* class (or a blanked frame). A model that reads lungs barely moves; a model that reads
  the cue loses specificity and AUC. :func:`selection_score` turns that into the number by
  which models are ranked (the worst balanced accuracy over clean and counterfactual images at
  the model's own threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pneumo_utils.data.frames import other_class_references, swap_frame
from pneumo_utils.data.tasks import predicted_labels

STATISTIC_GROUPS: dict[str, list[str]] = {
    "border intensity": ["border_left", "border_right", "border_top", "border_bottom", "border_p5"],
    "grey-level percentiles": ["p1", "p5", "p50", "p95", "p99"],
    "mean and spread": ["mean", "std"],
}
"""Groups of :func:`image_statistics` columns, each audited on its own, then all together."""

COUNTERFACTUALS = ("histogram_swap", "border_swap", "border_mask")
"""``histogram_swap``: the image's grey levels remapped (rank for rank) onto the histogram of
a reference image; ``border_swap``: its outer frame replaced by the reference's frame;
``border_mask``: its outer frame set to mid-grey."""


def image_statistics(images: np.ndarray, border: float = 0.05) -> pd.DataFrame:
    """Cheap per-image statistics that a shortcut could use, one row per image.

    ``images``: ``(n, h, w, 3)`` or ``(n, h, w)`` pixels in 0-255. Columns: mean grey level
    of the outer ``border`` share of each side (``border_left`` ... ``border_bottom``), the
    5th percentile of the frame (``border_p5``), grey-level percentiles of the whole image
    (``p1`` ... ``p99``), its ``mean`` and ``std``.
    """
    grey = _grey(images)
    n, h, w = grey.shape
    bh, bw = max(1, round(h * border)), max(1, round(w * border))
    frame = np.concatenate(
        [grey[:, :bh].reshape(n, -1), grey[:, -bh:].reshape(n, -1),
         grey[:, :, :bw].reshape(n, -1), grey[:, :, -bw:].reshape(n, -1)], axis=1
    )
    flat = grey.reshape(n, -1)
    percentiles = np.percentile(flat, [1, 5, 50, 95, 99], axis=1)
    return pd.DataFrame({
        "border_left": grey[:, :, :bw].mean(axis=(1, 2)),
        "border_right": grey[:, :, -bw:].mean(axis=(1, 2)),
        "border_top": grey[:, :bh].mean(axis=(1, 2)),
        "border_bottom": grey[:, -bh:].mean(axis=(1, 2)),
        "border_p5": np.percentile(frame, 5, axis=1),
        **{f"p{q}": v for q, v in zip((1, 5, 50, 95, 99), percentiles, strict=True)},
        "mean": flat.mean(axis=1),
        "std": flat.std(axis=1),
    })


def audit(
    train_stats: pd.DataFrame,
    y_train: np.ndarray,
    val_stats: pd.DataFrame,
    y_val: np.ndarray,
    groups: Mapping[str, list[str]] | None = None,
) -> pd.DataFrame:
    """Validation AUC of a logistic regression on each group of trivial statistics.

    Fitted on ``train_stats`` (from :func:`image_statistics`), scored on ``val_stats``; one
    row per group of :data:`STATISTIC_GROUPS` plus ``all of them``, sorted by AUC. An AUC
    near 0.5 means the statistics carry no label information; the Kermany training images
    give about 0.96 with all of them. Compare with the CNNs' validation AUC: a CNN that
    scores barely more than the audit may be using the same cues.
    """
    groups = dict(STATISTIC_GROUPS if groups is None else groups)
    groups["all of them"] = sorted({c for cols in groups.values() for c in cols})
    rows = []
    for name, columns in groups.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(train_stats[columns], np.asarray(y_train))
        proba = model.predict_proba(val_stats[columns])[:, 1]
        rows.append({"statistics": name, "columns": ", ".join(columns),
                     "validation auc": float(skm.roc_auc_score(y_val, proba))})
    return pd.DataFrame(rows).set_index("statistics").sort_values("validation auc", ascending=False)


def counterfactual(
    image: np.ndarray, reference: np.ndarray, kind: str, border: float = 0.12
) -> np.ndarray:
    """One counterfactual copy of ``image`` (``(h, w, 3)``, 0-255), float32; see
    :data:`COUNTERFACTUALS`. ``reference`` has the same shape; ``border`` is the frame's share
    of each side."""
    image = np.asarray(image, dtype=np.float32)
    if kind == "histogram_swap":
        grey, ref = _grey(image[None])[0], _grey(np.asarray(reference)[None])[0]
        ranks = np.argsort(np.argsort(grey.ravel(), kind="stable"), kind="stable")
        matched = np.sort(ref.ravel())[(ranks * ref.size) // grey.size].reshape(grey.shape)
        return np.repeat(matched[..., None], 3, axis=-1).astype(np.float32)
    if kind == "border_swap":
        return swap_frame(image, np.asarray(reference, dtype=np.float32), border)
    if kind == "border_mask":
        return swap_frame(image, np.full_like(image, 128.0), border)
    raise ValueError(f"unknown counterfactual {kind!r}; choose from {', '.join(COUNTERFACTUALS)}")


def counterfactuals(
    images: np.ndarray,
    references: np.ndarray,
    kinds: tuple[str, ...] = COUNTERFACTUALS,
    border: float = 0.12,
) -> dict[str, np.ndarray]:
    """``{"clean": images, kind: counterfactual images, ...}``, each ``(n, h, w, 3)`` float32.

    ``references[i]`` is the image whose cue ``images[i]`` receives (see
    :func:`~pneumo_utils.data.frames.other_class_references`).
    """
    out = {"clean": np.asarray(images, dtype=np.float32)}
    for kind in kinds:
        out[kind] = np.stack([counterfactual(x, r, kind, border) for x, r in zip(images, references, strict=True)])
    return out


def cue_test(
    predict: Callable[[np.ndarray], np.ndarray],
    sets: Mapping[str, np.ndarray],
    labels: np.ndarray,
    threshold: float | None,
) -> pd.DataFrame:
    """How a model's decisions move when the cue is swapped; one row per image set.

    ``predict`` maps ``(n, h, w, 3)`` pixels to a binary model's probabilities of the positive
    class ``(n,)`` (e.g. ``lambda x: model.predict(x, verbose=0).ravel()``), or to ``(n, K)``
    class probabilities; ``sets`` comes from :func:`counterfactuals` and must include
    ``"clean"``. Binary columns: ``auc``, ``sensitivity``, ``specificity`` and ``balanced
    accuracy`` at ``threshold`` (the model's own, chosen on clean validation images),
    ``flipped`` (share of decisions that differ from clean) and ``class-0 score`` (median
    output, the probability of class 1, over the class-0 images). With K classes (``threshold`` None, decisions
    by argmax): ``auc`` (macro one-vs-rest), ``balanced accuracy`` (mean recall over the
    classes) and ``flipped``.
    """
    labels = np.asarray(labels).astype(int)
    scores = {name: np.asarray(predict(x), dtype=np.float64) for name, x in sets.items()}
    clean = predicted_labels(scores["clean"], threshold)
    rows = {}
    for name, proba in scores.items():
        pred = predicted_labels(proba, threshold)
        if proba.ndim == 2 and proba.shape[1] > 1:
            rows[name] = {
                "auc": float(skm.roc_auc_score(labels, proba, multi_class="ovr",
                                               labels=list(range(proba.shape[1])))),
                "balanced accuracy": float(skm.balanced_accuracy_score(labels, pred)),
                "flipped": float(np.mean(pred != clean)),
            }
            continue
        proba = proba.reshape(-1)
        sensitivity = float(np.mean(pred[labels == 1]))
        specificity = float(np.mean(pred[labels == 0] == 0))
        rows[name] = {
            "auc": float(skm.roc_auc_score(labels, proba)),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "balanced accuracy": (sensitivity + specificity) / 2,
            "flipped": float(np.mean(pred != clean)),
            "class-0 score": float(np.median(proba[labels == 0])),
        }
    return pd.DataFrame(rows).T


def validation_cue_test(
    model,
    paths: Sequence[str],
    labels: np.ndarray,
    reference_paths: Sequence[str],
    reference_labels: np.ndarray,
    threshold: float | None,
    max_images: int | None = 300,
    batch_size: int = 32,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`cue_test` of a Keras ``model`` on validation images, in one call.

    ``paths``/``labels`` are the validation images; each gets its cue from a random
    reference of another class (``reference_paths``/``reference_labels``, e.g. the
    training images). ``max_images`` scores a class-stratified random sample instead of every
    image (each costs four forward passes). ``threshold`` is a binary model's own, chosen on
    clean validation predictions; ``None`` for a softmax model (argmax).
    """
    from pneumo_utils.data.pipelines import load_images

    labels = np.asarray(labels)
    rows = np.arange(len(paths))
    if max_images is not None and max_images < len(paths):
        rows, _ = train_test_split(rows, train_size=max_images, stratify=labels, random_state=seed)
    refs = other_class_references(labels[rows], reference_labels, seed=seed)
    size = int(model.inputs[0].shape[1])
    sets = counterfactuals(load_images([paths[i] for i in rows], size),
                           load_images([reference_paths[j] for j in refs], size))
    def predict(images: np.ndarray) -> np.ndarray:
        proba = model.predict(images, batch_size=batch_size, verbose=0)
        return proba.reshape(-1) if proba.shape[-1] == 1 else proba

    return cue_test(predict, sets, labels[rows], threshold)


SELECTION_RULE = (
    "worst balanced accuracy over clean and counterfactual validation images "
    "(histogram swap, border swap, border mask) at the model's own decision rule (its "
    "validation-chosen threshold, or argmax for three classes)"
)


def selection_score(table: pd.DataFrame) -> float:
    """The number models are ranked by: the worst ``balanced accuracy`` row of :func:`cue_test`.

    Higher is better. A model must be right on clean validation images *and* keep its
    decisions when the intensity and border cues are swapped; see :data:`SELECTION_RULE`.
    """
    return float(table["balanced accuracy"].min())


def _grey(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    return images.mean(axis=-1) if images.ndim == 4 else images
