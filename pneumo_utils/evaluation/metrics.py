"""Metrics, threshold rules, bootstrap confidence intervals and calibration.

Every metric comes from scikit-learn. A binary task's model gives P(positive class) per
image and decides with a threshold that is always chosen on *validation* predictions and then
applied unchanged to test predictions; reports show it beside the default 0.5 so a reader can
see what the choice did. A three-class model gives softmax probabilities ``(n, K)`` and
decides by the most probable class (argmax, no threshold): :func:`multiclass_metrics` reports
per-class precision, recall and F1, their macro and weighted averages, one-vs-rest ROC AUCs
and the confusion matrix.

The ``evaluate`` command (:mod:`pneumo_utils.evaluation.evaluate`) applies them to a saved model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, rankdata
from sklearn import metrics as skm

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.tasks import TASKS
from pneumo_utils.evaluation.selective import (
    DEFAULT_TARGET_ACCURACY,
    MIN_IMAGES,
    choose_band,
    selective_report,
)
from pneumo_utils.probability import (
    apply_softmax_temperature,
    apply_temperature,
    logit,
    sigmoid,
    softmax,
)

CI_METRICS = ("auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "brier")


MULTICLASS_CI_METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "brier")
"""Metrics of a multi-class evaluation that get bootstrap confidence intervals (``auc`` is the
macro one-vs-rest ROC AUC)."""


ARGMAX_RULE = "argmax: the most probable class; no threshold"


def choose_threshold(y_true: np.ndarray, proba: np.ndarray, rule: str = "youden") -> float:
    """Decision threshold from *validation* labels and probabilities.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 on the ROC curve;
    ``"f1"`` maximises F1; ``"sensitivity:0.95"`` is the highest threshold reaching that
    sensitivity; ``"fixed:0.5"`` returns the number given.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    name, _, value = rule.partition(":")
    if name in ("fixed", "sensitivity"):
        number = _rule_number(rule, value, 0.5 if name == "fixed" else 0.95)
        if name == "fixed":
            return number
    if len(np.unique(y_true)) < 2:
        raise ValueError("threshold selection needs both classes in the validation labels")
    if name == "youden":
        fpr, tpr, thresholds = skm.roc_curve(y_true, proba)
        best = np.argmax(tpr - fpr)
        return float(np.clip(thresholds[best], 0.0, 1.0))
    if name == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(y_true, proba)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[np.argmax(f1[:-1])])
    if name == "sensitivity":
        target = number
        fpr, tpr, thresholds = skm.roc_curve(y_true, proba)
        return float(np.clip(thresholds[np.argmax(tpr >= target)], 0.0, 1.0))
    raise ValueError(f"unknown threshold rule {rule!r}; use youden, f1, sensitivity:X or fixed:X")


def _rule_number(rule: str, value: str, default: float) -> float:
    """The number of a ``fixed:T`` or ``sensitivity:S`` rule, refused unless it is a usable
    probability: a threshold of 0 to 1, a sensitivity above 0 and at most 1 (a target above
    1 is never reached, and the threshold would fall to 1: every image negative)."""
    try:
        number = float(value) if value else default
    except ValueError:
        number = float("nan")
    name = rule.partition(":")[0]
    ok = 0.0 <= number <= 1.0 if name == "fixed" else 0.0 < number <= 1.0
    if not ok:
        expected = "a threshold from 0 to 1" if name == "fixed" else "a sensitivity above 0 and at most 1"
        raise ValueError(f"threshold rule {rule!r}: {value!r} is not {expected}; e.g. fixed:0.5 or sensitivity:0.95")
    return number


def describe_rule(rule: str, on: str = "validation predictions") -> str:
    """Plain-language description of a threshold rule applied ``on`` some predictions, for
    reports and sidecars."""
    name, _, value = rule.partition(":")
    return {
        "youden": f"Youden's J (max sensitivity + specificity - 1) on {on}",
        "f1": f"maximum F1 on {on}",
        "sensitivity": f"highest threshold with sensitivity >= {value} on {on}",
        "fixed": f"a fixed threshold of {value or 0.5}, not fitted to any predictions",
    }.get(name, rule)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """ECE: mean |observed positive rate - mean probability| over equal-width bins, weighted.

    ``proba`` ``(n,)`` is P(class 1). For softmax probabilities ``(n, K)`` this is the
    top-label ECE: the probability is the model's confidence in its most probable class and
    the outcome whether that class is right.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    if proba.ndim == 2:
        y_true, proba = proba.argmax(axis=1) == y_true, proba.max(axis=1)
    y_true = y_true.astype(float)
    bins = np.clip((proba * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(y_true[mask].mean() - proba[mask].mean())
    return float(ece)


def binary_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> dict:
    """Threshold-free (AUCs, Brier, ECE) and thresholded metrics for one set of predictions.

    Sensitivity is recall of PNEUMONIA; specificity is recall of NORMAL.
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float).reshape(-1)
    scores, counts = _threshold_metrics(y_true, proba, threshold)
    return {
        "n": int(len(y_true)),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        **scores,
        "ece": expected_calibration_error(y_true, proba),
        **counts,
    }


def _threshold_metrics(
    y_true: np.ndarray, proba: np.ndarray, threshold: float
) -> tuple[dict[str, float], dict[str, int]]:
    """:data:`CI_METRICS` and the confusion counts (``tp``, ``fp``, ``tn``, ``fn``) of labels
    ``y_true`` ``(n,)`` (0/1) and probabilities ``proba`` ``(n,)`` at ``threshold``: the one
    implementation behind :func:`binary_metrics` and each resample of :func:`bootstrap_ci`.

    The AUCs come from scikit-learn (NaN unless both classes are present); the counting metrics
    and Brier are plain numpy (a ratio with a zero denominator is 0, as scikit-learn's
    ``zero_division=0``), which keeps a 1,000-resample bootstrap fast.
    """
    pred = proba >= threshold
    positive = y_true == 1
    tp, fn = int(np.sum(pred & positive)), int(np.sum(~pred & positive))
    fp, tn = int(np.sum(pred & ~positive)), int(np.sum(~pred & ~positive))
    sensitivity = tp / (tp + fn) if tp + fn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    both = tp + fn > 0 and tn + fp > 0
    scores = {
        "auc": float(skm.roc_auc_score(y_true, proba)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, proba)) if both else float("nan"),
        "accuracy": (tp + tn) / len(y_true) if len(y_true) else 0.0,
        "sensitivity": sensitivity,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "precision": precision,
        "f1": 2 * precision * sensitivity / (precision + sensitivity) if precision + sensitivity else 0.0,
        "brier": float(np.mean((proba - y_true) ** 2)),
    }
    return scores, {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def roc_points(y_true: np.ndarray, proba: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve of binary predictions as ``{"fpr": [...], "tpr": [...]}`` (rates in 0..1,
    4 decimals, scikit-learn's ``roc_curve`` without collinear points): what the index page
    draws, small enough for a metrics JSON. Empty lists when ``y_true`` holds one class."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = skm.roc_curve(y_true, np.asarray(proba, dtype=float).reshape(-1), drop_intermediate=True)
    return {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of :data:`CI_METRICS`.

    Images are resampled with replacement ``n_boot`` times, stratified by class so every
    resample has both classes. With ``groups`` (patient ids, one per image) whole patients
    are resampled instead (a cluster bootstrap, stratified by whether the patient has a
    positive image): images of one patient are correlated, so resampling images would give
    intervals that are too narrow. The threshold is held fixed: it was chosen on validation
    data, so the interval covers test-sampling variation only.

    Each proportion (:data:`PROPORTIONS`) gets at least its exact binomial interval
    (:func:`proportion_ci`, Clopper-Pearson, on the images): a percentile bootstrap
    degenerates on small or perfect samples (30 of 30 right resamples to 1.0 - 1.0 every
    time), where the exact interval is 0.88 - 1.0.
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float).reshape(-1)
    samples = [_threshold_metrics(y_true[idx], proba[idx], threshold)[0]
               for idx in _resamples(y_true, n_boot, seed, groups)]
    intervals = _percentile_intervals(samples, CI_METRICS, level)
    _, counts = _threshold_metrics(y_true, proba, threshold)
    right_of = {"sensitivity": (counts["tp"], counts["tp"] + counts["fn"]),
                "specificity": (counts["tn"], counts["tn"] + counts["fp"]),
                "accuracy": (counts["tp"] + counts["tn"], len(y_true))}
    for name, (k, n) in right_of.items():
        lo, hi = proportion_ci(k, n, level)
        intervals[name] = (min(intervals[name][0], lo), max(intervals[name][1], hi))
    return intervals


PROPORTIONS = ("sensitivity", "specificity", "accuracy")
"""Metrics of :func:`bootstrap_ci` that are a share of images, whose intervals cover at least
the exact binomial interval."""


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion ``successes / n`` at ``level``
    (``scipy.stats.binomtest``); ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return float("nan"), float("nan")
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def _resamples(
    y_true: np.ndarray, n_boot: int, seed: int, groups: np.ndarray | None
) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap index arrays into ``y_true``, stratified by class.

    Without ``groups`` images are drawn with replacement within each class; with ``groups``
    (one patient id per image) whole patients are drawn within the stratum of their highest
    label, and each brings all its images.
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y_true))]
        unit_label = y_true
    else:
        codes, inverse = np.unique(np.asarray(groups), return_inverse=True)
        units = [np.flatnonzero(inverse == g) for g in range(len(codes))]
        unit_label = np.array([y_true[rows].max() for rows in units])
    strata = [np.flatnonzero(unit_label == c) for c in np.unique(unit_label)]
    for _ in range(int(n_boot)):
        chosen = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        yield np.concatenate([units[u] for u in chosen])


def _percentile_intervals(
    samples: list[dict[str, float]], names: Sequence[str], level: float
) -> dict[str, tuple[float, float]]:
    """Percentile interval at ``level`` of each metric in ``names`` over bootstrap resamples
    (resamples where a metric is undefined, NaN, are left out)."""
    tail = (1.0 - level) / 2 * 100
    out = {}
    for m in names:
        values = np.array([sample[m] for sample in samples], dtype=float)
        out[m] = (float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail)))
    return out


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of softmax probabilities ``proba`` ``(n, K)`` against labels ``y_true`` ``(n,)``
    in ``0..K-1``, deciding by the most probable class (argmax).

    Keys: ``n``; ``class_counts`` {name: images}; ``accuracy``; ``balanced_accuracy`` (mean
    recall over classes); ``auc`` (macro one-vs-rest ROC AUC), ``auc_weighted`` (weighted by
    class prevalence) and ``auc_per_class`` {name: AUC of that class against the rest};
    ``macro_`` and ``weighted_`` ``precision``/``recall``/``f1``; ``per_class`` {name:
    {precision, recall, f1, support}}; ``confusion_matrix`` (rows the true class, columns the
    predicted one, in label order); ``brier`` (mean over images of the sum over classes of
    (p - one-hot)^2, from 0 to 2); ``ece`` (top-label); ``log_loss``. An AUC is NaN when its
    class, or every other class, is missing from ``y_true``.
    """
    y_true, proba = _check_multiclass(y_true, proba, class_names)
    k, labels = proba.shape[1], list(range(proba.shape[1]))
    y_pred = proba.argmax(axis=1)
    present = np.isin(labels, y_true)
    per_class_auc = [
        float(skm.roc_auc_score(y_true == c, proba[:, c])) if 0 < np.sum(y_true == c) < len(y_true)
        else float("nan")
        for c in labels
    ]
    all_present = bool(present.all())
    auc = {
        average: float(skm.roc_auc_score(y_true, proba, multi_class="ovr", average=average,
                                         labels=labels)) if all_present else float("nan")
        for average in ("macro", "weighted")
    }
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    averaged = {
        average: skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )[:3]
        for average in ("macro", "weighted")
    }
    names = list(class_names)
    return {
        "n": int(len(y_true)),
        "class_counts": {name: int(n) for name, n in zip(names, np.bincount(y_true, minlength=k), strict=True)},
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean(recall[present])),
        "auc": auc["macro"],
        "auc_weighted": auc["weighted"],
        "auc_per_class": dict(zip(names, per_class_auc, strict=True)),
        **{f"{average}_{metric}": float(value)
           for average, values in averaged.items()
           for metric, value in zip(("precision", "recall", "f1"), values, strict=True)},
        "per_class": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]),
                   "f1": float(f1[c]), "support": int(support[c])}
            for c, name in enumerate(names)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "brier": float(skm.brier_score_loss(y_true, proba, labels=labels)),
        "ece": expected_calibration_error(y_true, proba),
        "log_loss": float(skm.log_loss(y_true, proba, labels=labels)),
    }


def _check_multiclass(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` int and probabilities ``(n, K)`` float64, each row divided by its sum
    (a float32 softmax sums to 1 only to about 1e-7, which scikit-learn warns about), or
    ``ValueError`` saying what does not fit (rows that do not sum to 1 within ``np.allclose``
    are not softmax output: logits, or one column per binary model)."""
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or proba.shape[1] != len(class_names) or len(proba) != len(y_true):
        raise ValueError(
            f"proba must be (n, K) = ({len(y_true)}, {len(class_names)}) softmax probabilities, "
            f"one column per class of {list(class_names)}; got shape {proba.shape}"
        )
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= len(class_names)):
        raise ValueError(f"labels must be 0..{len(class_names) - 1} (one per class of "
                         f"{list(class_names)}); got {sorted(set(y_true.tolist()))}")
    sums = proba.sum(axis=1)
    if np.any(proba < 0) or not np.allclose(sums, 1.0):
        raise ValueError("proba rows must be probabilities summing to 1 (a softmax output); "
                         f"row sums range from {sums.min():.6g} to {sums.max():.6g}")
    return y_true, proba / sums[:, None]


def multiclass_bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of :data:`MULTICLASS_CI_METRICS` for softmax
    probabilities ``proba`` ``(n, K)`` and labels ``y_true`` ``(n,)``.

    Resampling as in :func:`bootstrap_ci`: images stratified by class, or, with ``groups``
    (patient ids), whole patients stratified by their highest label. The decision is argmax,
    so nothing is held fixed but the model's outputs.
    """
    y_true, proba = _check_multiclass(y_true, proba, range(np.shape(proba)[-1]))
    k = proba.shape[1]
    samples = [_multiclass_ci_metrics(y_true[idx], proba[idx], k)
               for idx in _resamples(y_true, n_boot, seed, groups)]
    return _percentile_intervals(samples, MULTICLASS_CI_METRICS, level)


def _multiclass_ci_metrics(y_true: np.ndarray, proba: np.ndarray, k: int) -> dict[str, float]:
    """:data:`MULTICLASS_CI_METRICS` as :func:`multiclass_metrics` computes them, for one
    bootstrap resample, in plain numpy: the counts come from one confusion matrix and each
    one-vs-rest AUC from ranks (the Mann-Whitney form of ROC AUC, ties counted half), which
    makes a 1,000-resample bootstrap about ten times faster than scikit-learn per resample."""
    n = len(y_true)
    confusion = np.bincount(y_true * k + proba.argmax(axis=1), minlength=k * k).reshape(k, k)
    support, predicted, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=precision + recall > 0)
    ranks = rankdata(proba, axis=0)
    positive = y_true[:, None] == np.arange(k)
    n_pos = positive.sum(axis=0)
    both = (n_pos > 0) & (n_pos < n)
    auc = ((ranks * positive).sum(axis=0) - n_pos * (n_pos + 1) / 2) / np.maximum(n_pos * (n - n_pos), 1)
    return {
        "auc": float(auc.mean()) if both.all() else float("nan"),
        "accuracy": float(hits.sum() / n),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float(f1 @ support / n),
        "brier": float(np.mean(np.sum((proba - positive) ** 2, axis=1))),
    }


def fit_temperature(y_val: np.ndarray, proba_val: np.ndarray) -> float:
    """Temperature T minimising validation log-loss of ``sigmoid(logit(p) / T)``.

    T > 1 softens over-confident probabilities. Ranking (and so AUC) is unchanged.
    """
    y = np.asarray(y_val, dtype=float)
    logits = logit(np.asarray(proba_val, dtype=float))

    def nll(t: float) -> float:
        return float(skm.log_loss(y, sigmoid(logits / t), labels=[0, 1]))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def fit_softmax_temperature(y_val: np.ndarray, proba_val: np.ndarray) -> float:
    """Temperature T minimising validation log-loss of ``softmax(log(p) / T)`` for softmax
    probabilities ``(n, K)`` (see :func:`pneumo_utils.probability.apply_softmax_temperature`).

    T > 1 softens over-confident probabilities; argmax, and so every decision, is unchanged.
    """
    y = np.asarray(y_val).astype(int)
    log_p = np.log(np.clip(np.asarray(proba_val, dtype=float), 1e-12, 1.0))
    labels = list(range(log_p.shape[1]))

    def nll(t: float) -> float:
        return float(skm.log_loss(y, softmax(log_p / t), labels=labels))

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def evaluation_report(
    y_test: np.ndarray,
    proba_test: np.ndarray,
    y_val: np.ndarray,
    proba_val: np.ndarray,
    rule: str = "youden",
    n_boot: int = 1000,
    seed: int = 0,
    groups_test: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict:
    """Everything a report states about one model on its validation and test predictions.

    Both kinds also get ``uncertain``, the abstention band chosen on validation for
    confident decisions at least ``target_accuracy`` accurate
    (:func:`pneumo_utils.evaluation.selective.choose_band`; ``None`` with fewer than
    :data:`~pneumo_utils.evaluation.selective.MIN_IMAGES` validation images), and
    ``selective``: what that band does on the test split (coverage, accuracy of the confident
    decisions, the risk-coverage curve).

    Binary (``proba_test`` ``(n,)``, P(second class)): the threshold and how it was chosen on
    validation (``rule``), validation metrics, test metrics with bootstrap CIs at that
    threshold, test metrics at the default 0.5 for comparison, and a temperature fitted on
    validation with the test calibration (Brier, ECE) it gives, and the test ROC curve
    (``roc``, :func:`roc_points`). The threshold applies to the
    model's raw output; temperature scaling only recalibrates the probabilities shown to
    users. ``class_names`` default to NORMAL/PNEUMONIA.

    Three or more classes (``proba_test`` ``(n, K)`` softmax): :func:`multiclass_metrics` on
    validation and test, the test ones with ``<metric>_ci`` for
    :data:`MULTICLASS_CI_METRICS`, ``decision`` argmax with ``threshold`` ``None`` (``rule``
    is not used), and a softmax temperature fitted on validation with the test calibration it
    gives. ``class_names`` default to those of the task with ``K`` classes.
    """
    proba_test, proba_val = np.asarray(proba_test, dtype=float), np.asarray(proba_val, dtype=float)
    if proba_test.ndim == 2 and proba_test.shape[1] >= 3:
        report = _multiclass_report(y_test, proba_test, y_val, proba_val, n_boot, seed, groups_test,
                                    _class_names(proba_test.shape[1], class_names))
        return {**report, **_selective(y_val, proba_val, y_test, proba_test, None, target_accuracy)}
    if proba_test.ndim == 2 and proba_test.shape[1] != 1:
        raise ValueError(
            f"proba_test has shape {proba_test.shape}: give a binary model's P(positive class) "
            "as (n,), or softmax probabilities of 3 or more classes as (n, K)"
        )
    proba_test, proba_val = proba_test.reshape(-1), proba_val.reshape(-1)
    threshold = choose_threshold(y_val, proba_val, rule)
    test = binary_metrics(y_test, proba_test, threshold)
    cis = bootstrap_ci(y_test, proba_test, threshold, n_boot=n_boot, seed=seed, groups=groups_test)
    test.update({f"{m}_ci": list(ci) for m, ci in cis.items()})
    temperature = fit_temperature(y_val, proba_val)
    return {
        "class_names": list(_class_names(2, class_names)),
        "decision": "threshold",
        "threshold": threshold,
        "threshold_rule": describe_rule(rule),
        "validation": binary_metrics(y_val, proba_val, threshold),
        "test": test,
        "roc": roc_points(y_test, proba_test),
        "test_at_0.5": binary_metrics(y_test, proba_test, 0.5),
        "ci_method": _ci_method(n_boot, groups_test),
        "temperature": temperature,
        "test_calibrated": calibration_summary(y_test, apply_temperature(proba_test, temperature)),
        **_selective(y_val, proba_val, y_test, proba_test, threshold, target_accuracy),
    }


def _selective(y_val, proba_val, y_test, proba_test, threshold, target_accuracy) -> dict:
    """``uncertain`` (the band chosen on validation) and ``selective`` (its test figures)."""
    if len(np.asarray(y_val)) < MIN_IMAGES:
        return {"uncertain": None, "selective": None}
    band = choose_band(y_val, proba_val, threshold, target_accuracy=target_accuracy,
                       chosen_on=f"validation predictions ({len(np.asarray(y_val))} images)")
    return {"uncertain": band, "selective": selective_report(y_test, proba_test, threshold, band)}


EXTERNAL_NOTE = ("scored zero-shot: neither weights nor threshold were fitted on these images; "
                 "the decision rule is the one chosen on validation")


def external_report(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    threshold: float | None,
    data: str,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    band: dict | None = None,
) -> dict:
    """Figures on a labelled external validation set, at the model's own decision rule.

    With ``band`` (the model's ``uncertain`` record, chosen on validation), ``selective``
    gives what it does here (:func:`pneumo_utils.evaluation.selective.selective_report`).

    Why: a same-source test split scores almost every model at AUC 0.99+ and cannot say how a
    model fares on another site's images; a small labelled external set can. Nothing is chosen
    on it here (see :data:`EXTERNAL_NOTE`): a binary model keeps ``threshold`` (from
    validation), a softmax model (``proba`` ``(n, K)``, ``threshold=None``) decides by argmax.
    Returns the metrics of :func:`binary_metrics` (or :func:`multiclass_metrics`) with
    ``<metric>_ci`` bootstrap intervals (patients when ``groups`` is given), a binary model's
    ROC curve (``roc``, :func:`roc_points`), and ``data``
    (where the images came from), ``counts`` per class and ``note``.
    """
    proba = np.asarray(proba, dtype=float)
    y_true = np.asarray(y_true).astype(int)
    if proba.ndim == 2 and proba.shape[1] >= 3:
        names = _class_names(proba.shape[1], class_names)
        figures = multiclass_metrics(y_true, proba, names)
        cis = multiclass_bootstrap_ci(y_true, proba, n_boot=n_boot, seed=seed, groups=groups)
    else:
        if threshold is None:
            raise ValueError("a binary model's external figures need its threshold (chosen on validation)")
        names = _class_names(2, class_names)
        proba = proba.reshape(-1)
        figures = binary_metrics(y_true, proba, threshold)
        cis = bootstrap_ci(y_true, proba, threshold, n_boot=n_boot, seed=seed, groups=groups)
        figures["roc"] = roc_points(y_true, proba)
    figures.update({f"{m}_ci": list(ci) for m, ci in cis.items()})
    if band is not None:
        figures["selective"] = selective_report(y_true, proba, threshold if proba.ndim == 1 else None, band)
    counts = {name: int((y_true == k).sum()) for k, name in enumerate(names)}
    return {**figures, "data": data, "counts": counts, "ci_method": _ci_method(n_boot, groups),
            "note": EXTERNAL_NOTE}


def _multiclass_report(
    y_test: np.ndarray,
    proba_test: np.ndarray,
    y_val: np.ndarray,
    proba_val: np.ndarray,
    n_boot: int,
    seed: int,
    groups_test: np.ndarray | None,
    class_names: Sequence[str],
) -> dict:
    """:func:`evaluation_report` for softmax probabilities ``(n, K)``."""
    test = multiclass_metrics(y_test, proba_test, class_names)
    cis = multiclass_bootstrap_ci(y_test, proba_test, n_boot=n_boot, seed=seed, groups=groups_test)
    test.update({f"{m}_ci": list(ci) for m, ci in cis.items()})
    temperature = fit_softmax_temperature(y_val, proba_val)
    return {
        "class_names": list(class_names),
        "decision": "argmax",
        "threshold": None,
        "threshold_rule": ARGMAX_RULE,
        "validation": multiclass_metrics(y_val, proba_val, class_names),
        "test": test,
        "ci_method": _ci_method(n_boot, groups_test),
        "temperature": temperature,
        "test_calibrated": calibration_summary(
            y_test, apply_softmax_temperature(proba_test, temperature)
        ),
    }


def _ci_method(n_boot: int, groups: np.ndarray | None) -> str:
    """How the confidence intervals were made, for reports."""
    return (f"{n_boot} bootstrap resamples of " + ("patients" if groups is not None else "images")
            + ", stratified by class")


def _class_names(k: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """``class_names`` checked to be ``k`` names; by default NORMAL/PNEUMONIA for two
    classes, else the names of the task with ``k`` classes."""
    if class_names is None:
        if k == 2:
            return tuple(CLASS_NAMES)
        matching = [t.class_names for t in TASKS.values() if t.n_classes == k]
        if not matching:
            raise ValueError(f"no task has {k} classes; pass class_names (one per column)")
        return matching[0]
    if len(class_names) != k:
        raise ValueError(f"class_names {list(class_names)} must name {k} classes, one per "
                         "column of the probabilities")
    return tuple(class_names)


def calibration_summary(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Brier score and ECE of one set of probabilities: P(class 1) ``(n,)``, or softmax
    probabilities ``(n, K)`` (Brier summed over classes, from 0 to 2; top-label ECE)."""
    proba = np.asarray(proba, dtype=float)
    labels = list(range(proba.shape[1])) if proba.ndim == 2 else None
    return {
        "brier": float(skm.brier_score_loss(y_true, proba, labels=labels)),
        "ece": expected_calibration_error(y_true, proba),
    }


def metrics_table(report: dict) -> pd.DataFrame:
    """Test metrics with CIs, for display, from an :func:`evaluation_report`.

    Binary: beside the same metrics at threshold 0.5 and on validation. Three classes: the
    metrics of :data:`MULTICLASS_CI_METRICS` and each class's one-vs-rest AUC, on test (with
    CIs) and validation. With ``report["external"]`` (:func:`external_report`), two more
    columns: external validation at the same decision rule, and its CI.
    """
    if report.get("decision") == "argmax":
        return _multiclass_metrics_table(report)
    external = report.get("external")
    rows = []
    for m in CI_METRICS:
        lo, hi = report["test"][f"{m}_ci"]
        row = {
            "metric": m,
            "test (val-chosen threshold)": report["test"][m],
            "95% CI": f"{lo:.3f} - {hi:.3f}",
            "test @ 0.5": report["test_at_0.5"][m],
            "validation": report["validation"][m],
        }
        rows.append({**row, **_external_cells(external, m)})
    return pd.DataFrame(rows).set_index("metric").round(4)


def _external_cells(external: dict | None, metric: str) -> dict:
    """The external-validation value and CI of ``metric`` for a metrics table row."""
    if not external or metric not in external:
        return {}
    lo, hi = external.get(f"{metric}_ci", (float("nan"), float("nan")))
    return {"external validation": external[metric], "external 95% CI": f"{lo:.3f} - {hi:.3f}"}


def _multiclass_metrics_table(report: dict) -> pd.DataFrame:
    """:func:`metrics_table` for a three-class (argmax) evaluation."""
    test, validation = report["test"], report["validation"]
    rows = []
    for m in MULTICLASS_CI_METRICS:
        lo, hi = test[f"{m}_ci"]
        name = "auc (macro one-vs-rest)" if m == "auc" else m
        rows.append({"metric": name, "test (argmax)": test[m], "95% CI": f"{lo:.3f} - {hi:.3f}",
                     "validation": validation[m], **_external_cells(report.get("external"), m)})
    for name, auc in test["auc_per_class"].items():
        external = report.get("external") or {}
        rows.append({"metric": f"auc {name} vs rest", "test (argmax)": auc, "95% CI": "",
                     "validation": validation["auc_per_class"][name],
                     **({"external validation": external["auc_per_class"][name], "external 95% CI": ""}
                        if "auc_per_class" in external else {})})
    return pd.DataFrame(rows).set_index("metric").round(4)


def classification_table(
    y_true: np.ndarray,
    proba: np.ndarray,
    threshold: float | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support (scikit-learn's classification report).

    ``proba`` ``(n,)`` is a binary model's P(second class), decided at ``threshold`` (required:
    the one chosen on validation); ``(n, K)`` softmax probabilities are decided by argmax.
    ``class_names`` default as in :func:`evaluation_report`.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim == 2 and proba.shape[1] >= 3:
        y_pred = proba.argmax(axis=1)
    elif threshold is None:
        raise ValueError("a binary classification table needs the decision threshold (the "
                         "one chosen on validation)")
    else:
        y_pred = (proba.reshape(-1) >= threshold).astype(int)
    k = proba.shape[1] if proba.ndim == 2 and proba.shape[1] >= 3 else 2
    report = skm.classification_report(
        y_true,
        y_pred,
        labels=list(range(k)),
        target_names=list(_class_names(k, class_names)),
        output_dict=True,
        zero_division=0,
    )
    return pd.DataFrame(report).T.round(4)
