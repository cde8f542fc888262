""""Uncertain, refer to a reader" as an answer: selective classification.

A classifier that must answer every image gives its least certain answers the same weight as
its surest. Selective classification (Geifman and El-Yaniv, 2017) lets the model abstain on the
images closest to its decision boundary, so that the decisions it does make reach a stated
accuracy; the price is coverage, the share of images it decides. Here the abstention band is
chosen on labelled data (validation, or a site's calibration set) for a target accuracy of the
confident decisions and stored in the sidecar (``uncertain``); ``predict`` then answers
``UNCERTAIN: refer to a reader`` inside the band.

How sure a decision is (its *margin*):

- a binary model (P(positive) per image, decided at ``threshold``): the distance of the
  output from the threshold on the log-odds scale, ``|logit(p) - logit(threshold)|``, so the
  band is symmetric in log-odds and reads as two probabilities ``low`` and ``high``;
- a softmax model (``(n, K)``, decided by argmax): the probability of the most probable class.

Everything here is NumPy, so exports use it without TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_TARGET_ACCURACY = 0.97
"""Accuracy the confident decisions should reach on the data that chooses the band."""

MIN_IMAGES = 20
"""Fewest labelled images a band is chosen on; with fewer, every accuracy is a guess."""

_EPS = 1e-7


def margins(proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """How sure each decision is: ``(n,)``.

    ``proba`` is ``(n,)`` P(positive) with ``threshold`` (log-odds distance from the
    threshold, 0 on it) or ``(n, K)`` softmax probabilities with ``threshold=None`` (the top
    probability).
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim == 2 and proba.shape[1] >= 3:
        return proba.max(axis=1)
    if threshold is None:
        raise ValueError("a binary model's margins need its decision threshold")
    p = np.clip(proba.reshape(-1), _EPS, 1 - _EPS)
    t = min(max(float(threshold), _EPS), 1 - _EPS)
    return np.abs(np.log(p / (1 - p)) - math.log(t / (1 - t)))


def _correct(y_true: np.ndarray, proba: np.ndarray, threshold: float | None) -> np.ndarray:
    proba = np.asarray(proba, dtype=float)
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    if proba.ndim == 2 and proba.shape[1] >= 3:
        return proba.argmax(axis=1) == y_true
    return (proba.reshape(-1) >= float(threshold)).astype(int) == y_true


def risk_coverage(y_true: np.ndarray, proba: np.ndarray, threshold: float | None = None) -> dict:
    """The risk-coverage curve: deciding only the most confident images, what share is decided
    (``coverage``) and how accurate those decisions are (``accuracy``), from the single surest
    image to all of them. Lists of equal length, one point per distinct margin (ties decided
    together), coverage increasing; ``margin`` is the smallest margin decided at each point."""
    m = margins(proba, threshold)
    correct = _correct(y_true, proba, threshold)
    order = np.argsort(-m, kind="stable")
    m, correct = m[order], correct[order]
    hits = np.cumsum(correct)
    ends = np.r_[np.nonzero(np.diff(m))[0], len(m) - 1] if len(m) else np.array([], dtype=int)
    n = max(len(m), 1)
    return {
        "coverage": [round(float((e + 1) / n), 4) for e in ends],
        "accuracy": [round(float(hits[e] / (e + 1)), 4) for e in ends],
        "margin": [float(m[e]) for e in ends],
    }


def choose_band(
    y_true: np.ndarray,
    proba: np.ndarray,
    threshold: float | None = None,
    *,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    chosen_on: str = "validation predictions",
) -> dict:
    """The abstention band with the largest coverage whose confident decisions reach
    ``target_accuracy`` on these labelled predictions.

    Returns the sidecar's ``uncertain`` record: ``min_margin`` (decide only when the margin is
    at least this; 0 means no band was needed), ``margin`` (how it is measured), for a binary
    model ``low``/``high`` (P(positive) between them is uncertain), the ``target_accuracy``,
    ``chosen_on``, and what the band gave there (``coverage``, ``accuracy_confident``,
    ``images``). When no band reaches the target the record has ``reachable: false`` and
    ``min_margin`` ``None`` (nothing is ever called uncertain: the target cannot be met on
    this data, which a report states rather than hides). Raises ``ValueError`` for a target
    outside (0.5, 1) or fewer than :data:`MIN_IMAGES` images.
    """
    if not 0.5 < float(target_accuracy) < 1.0:
        raise ValueError(f"target_accuracy must be between 0.5 and 1 (exclusive), got {target_accuracy!r}")
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    if len(y_true) < MIN_IMAGES:
        raise ValueError(f"an uncertainty band needs at least {MIN_IMAGES} labelled images, got {len(y_true)}")
    curve = risk_coverage(y_true, proba, threshold)
    binary = threshold is not None and not (np.ndim(proba) == 2 and np.shape(proba)[1] >= 3)
    record: dict = {
        "margin": "|logit(P) - logit(threshold)|" if binary else "probability of the most probable class",
        "target_accuracy": float(target_accuracy),
        "chosen_on": chosen_on,
        "images": int(len(y_true)),
    }
    meets = [i for i, a in enumerate(curve["accuracy"]) if a >= target_accuracy]
    if not meets:
        return {**record, "reachable": False, "min_margin": None, "coverage": 1.0,
                "accuracy_confident": curve["accuracy"][-1]}
    best = meets[-1]
    last = len(curve["coverage"]) - 1
    if best == last:
        min_margin = 0.0
    else:
        min_margin = (curve["margin"][best] + curve["margin"][best + 1]) / 2
    record.update(reachable=True, min_margin=float(min_margin), coverage=curve["coverage"][best],
                  accuracy_confident=curve["accuracy"][best])
    if binary:
        record.update(_probability_band(float(threshold), float(min_margin)))
    return record


def _probability_band(threshold: float, min_margin: float) -> dict:
    """``low``/``high``: the band in P(positive) that a log-odds margin around ``threshold`` spans."""
    t = min(max(threshold, _EPS), 1 - _EPS)
    z = math.log(t / (1 - t))
    return {"low": 1 / (1 + math.exp(-(z - min_margin))), "high": 1 / (1 + math.exp(-(z + min_margin)))}


def uncertain(band: dict | None, proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Which images fall inside ``band`` (a :func:`choose_band` record): ``(n,)`` bools, all
    ``False`` without a band or with an unreachable one."""
    m = margins(proba, threshold)
    if not band or band.get("min_margin") is None:
        return np.zeros(len(m), dtype=bool)
    return m < float(band["min_margin"])


def selective_report(y_true: np.ndarray, proba: np.ndarray, threshold: float | None, band: dict | None) -> dict:
    """What ``band`` does on labelled predictions: ``coverage`` (share decided), ``uncertain``
    (images referred), ``accuracy_confident`` (accuracy of the decided ones; ``None`` when
    nothing is decided) beside ``accuracy_all``, and the ``risk_coverage`` curve."""
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    refer = uncertain(band, proba, threshold)
    correct = _correct(y_true, proba, threshold)
    decided = ~refer
    return {
        "coverage": float(decided.mean()) if len(decided) else 0.0,
        "uncertain": int(refer.sum()),
        "accuracy_confident": float(correct[decided].mean()) if decided.any() else None,
        "accuracy_all": float(correct.mean()) if len(correct) else None,
        "risk_coverage": risk_coverage(y_true, proba, threshold),
    }

