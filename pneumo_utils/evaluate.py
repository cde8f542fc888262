"""Metrics, threshold rules, bootstrap confidence intervals and calibration.

Every metric comes from scikit-learn. The decision threshold is always chosen on
*validation* predictions and then applied unchanged to test predictions; reports show it
beside the default 0.5 so a reader can see what the choice did.

Command line: ``python -m pneumo_utils.evaluate --model MODEL.keras --data DIR [--out F]``
evaluates a saved model on a ``{NORMAL,PNEUMONIA}`` folder (or a data root's ``test/``) with
the threshold stored beside the model, and prints one JSON object; ``--cue-test`` adds the
shortcut check of :mod:`pneumo_utils.shortcuts` (each image with the histogram or the frame of
an image of the other class from the same folder) and its selection score. Files left out (unreadable or
not images) are counted and named in the JSON (``skipped``), and so are images found in
sub-folders of a class folder (``nested_images``), which are scored with that class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm

from pneumo_utils import CLASS_NAMES
from pneumo_utils.datasets import load_class_folder, load_kermany
from pneumo_utils.runtime import apply_temperature, logit, sigmoid

CI_METRICS = ("auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "brier")


def choose_threshold(y_true: np.ndarray, proba: np.ndarray, rule: str = "youden") -> float:
    """Decision threshold from *validation* labels and probabilities.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 on the ROC curve;
    ``"f1"`` maximises F1; ``"sensitivity:0.95"`` is the highest threshold reaching that
    sensitivity; ``"fixed:0.5"`` returns the number given.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    name, _, value = rule.partition(":")
    if name == "fixed":
        return float(value or 0.5)
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
        target = float(value or 0.95)
        fpr, tpr, thresholds = skm.roc_curve(y_true, proba)
        return float(np.clip(thresholds[np.argmax(tpr >= target)], 0.0, 1.0))
    raise ValueError(f"unknown threshold rule {rule!r}; use youden, f1, sensitivity:X or fixed:X")


def describe_rule(rule: str) -> str:
    """Plain-language description of a threshold rule, for reports and sidecars."""
    name, _, value = rule.partition(":")
    return {
        "youden": "Youden's J (max sensitivity + specificity - 1) on validation predictions",
        "f1": "maximum F1 on validation predictions",
        "sensitivity": f"highest threshold with sensitivity >= {value} on validation predictions",
        "fixed": f"a fixed threshold of {value or 0.5}, not fitted to any predictions",
    }.get(name, rule)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """ECE: mean |observed positive rate - mean probability| over equal-width bins, weighted."""
    y_true, proba = np.asarray(y_true, dtype=float), np.asarray(proba, dtype=float)
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
    y_pred = (proba >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "n": int(len(y_true)),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        "auc": float(skm.roc_auc_score(y_true, proba)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, proba)) if both else float("nan"),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "sensitivity": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "specificity": float(skm.recall_score(1 - y_true, 1 - y_pred, zero_division=0)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "brier": float(skm.brier_score_loss(y_true, proba)),
        "ece": expected_calibration_error(y_true, proba),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


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
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot!r}")
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float).reshape(-1)
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y_true))]
        unit_label = y_true
    else:
        codes, inverse = np.unique(np.asarray(groups), return_inverse=True)
        units = [np.flatnonzero(inverse == g) for g in range(len(codes))]
        unit_label = np.array([y_true[rows].max() for rows in units])
    strata = [np.flatnonzero(unit_label == c) for c in (0, 1) if (unit_label == c).any()]
    samples = {m: [] for m in CI_METRICS}
    for _ in range(n_boot):
        chosen = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        idx = np.concatenate([units[u] for u in chosen])
        values = _ci_metrics(y_true[idx], proba[idx], threshold)
        for m in CI_METRICS:
            samples[m].append(values[m])
    tail = (1.0 - level) / 2 * 100
    return {
        m: (float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail)))
        for m, v in samples.items()
    }


def _ci_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    """:data:`CI_METRICS` as :func:`binary_metrics` computes them, for one bootstrap resample.

    The AUCs still come from scikit-learn; the counting metrics and Brier are plain numpy,
    which makes a 1,000-resample bootstrap several times faster than calling the full
    :func:`binary_metrics` (with its input validation) per resample.
    """
    pred = proba >= threshold
    positive = y_true == 1
    tp, fn = int(np.sum(pred & positive)), int(np.sum(~pred & positive))
    fp, tn = int(np.sum(pred & ~positive)), int(np.sum(~pred & ~positive))
    sensitivity = tp / (tp + fn) if tp + fn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    both = tp + fn > 0 and tn + fp > 0
    return {
        "auc": float(skm.roc_auc_score(y_true, proba)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, proba)) if both else float("nan"),
        "accuracy": (tp + tn) / len(y_true),
        "sensitivity": sensitivity,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "precision": precision,
        "f1": 2 * precision * sensitivity / (precision + sensitivity) if precision + sensitivity else 0.0,
        "brier": float(np.mean((proba - y_true) ** 2)),
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


def evaluation_report(
    y_test: np.ndarray,
    proba_test: np.ndarray,
    y_val: np.ndarray,
    proba_val: np.ndarray,
    rule: str = "youden",
    n_boot: int = 1000,
    seed: int = 0,
    groups_test: np.ndarray | None = None,
) -> dict:
    """Everything a report states about one model: the threshold and how it was chosen on
    validation, validation metrics, test metrics with bootstrap CIs at that threshold, test
    metrics at the default 0.5 for comparison, and a temperature fitted on validation with
    the test calibration (Brier, ECE) it gives. The threshold applies to the model's raw
    output; temperature scaling only recalibrates the probabilities shown to users."""
    threshold = choose_threshold(y_val, proba_val, rule)
    test = binary_metrics(y_test, proba_test, threshold)
    cis = bootstrap_ci(y_test, proba_test, threshold, n_boot=n_boot, seed=seed, groups=groups_test)
    test.update({f"{m}_ci": list(ci) for m, ci in cis.items()})
    temperature = fit_temperature(y_val, proba_val)
    return {
        "threshold": threshold,
        "threshold_rule": describe_rule(rule),
        "validation": binary_metrics(y_val, proba_val, threshold),
        "test": test,
        "test_at_0.5": binary_metrics(y_test, proba_test, 0.5),
        "ci_method": f"{n_boot} bootstrap resamples of "
                     + ("patients" if groups_test is not None else "images") + ", stratified by class",
        "temperature": temperature,
        "test_calibrated": calibration_summary(y_test, apply_temperature(proba_test, temperature)),
    }


def calibration_summary(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Brier score and ECE of one set of probabilities."""
    return {
        "brier": float(skm.brier_score_loss(y_true, proba)),
        "ece": expected_calibration_error(y_true, proba),
    }


def metrics_table(report: dict) -> pd.DataFrame:
    """Test metrics with CIs, beside the same metrics at threshold 0.5, for display."""
    rows = []
    for m in CI_METRICS:
        lo, hi = report["test"][f"{m}_ci"]
        rows.append(
            {
                "metric": m,
                "test (val-chosen threshold)": report["test"][m],
                "95% CI": f"{lo:.3f} - {hi:.3f}",
                "test @ 0.5": report["test_at_0.5"][m],
                "validation": report["validation"][m],
            }
        )
    return pd.DataFrame(rows).set_index("metric").round(4)


def classification_table(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support (scikit-learn's classification report)."""
    y_pred = (np.asarray(proba) >= threshold).astype(int)
    report = skm.classification_report(
        y_true,
        y_pred,
        labels=[0, 1],
        target_names=list(CLASS_NAMES),
        output_dict=True,
        zero_division=0,
    )
    return pd.DataFrame(report).T.round(4)


def _folder_index(data: str):
    """Index of a ``{NORMAL,PNEUMONIA}`` folder, or of a data root's ``test/`` split (the
    other splits need not exist)."""
    path = Path(data)
    if (path / "test").is_dir():
        return load_kermany(path, splits=("test",))
    return load_class_folder(path)


def main(argv: list[str] | None = None) -> int:
    """Evaluate a saved model on a folder and print one JSON object."""
    parser = argparse.ArgumentParser(
        prog="python -m pneumo_utils.evaluate",
        description="Evaluate a saved pneumo model on a {NORMAL,PNEUMONIA} folder.",
    )
    parser.add_argument(
        "--model", required=True, help="path to MODEL.keras, or an export MODEL.tflite / "
        "MODEL.onnx (run without TensorFlow); sidecar MODEL.json beside it"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="folder with NORMAL/ and PNEUMONIA/, or a data root with test/",
    )
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--cue-test",
        action="store_true",
        help="also score the images with the grey-level histogram or the outer frame of an image "
        "of the other class, or a blank frame, at the same threshold, and give the selection "
        "score (pneumo_utils.shortcuts)",
    )
    args = parser.parse_args(argv)

    from pneumo_utils.io import ModelFileError, write_json_atomic
    from pneumo_utils.runtime import is_exported, load_any, predict_paths

    for flag, value in (("--batch-size", args.batch_size), ("--n-boot", args.n_boot)):
        if value < 1:
            return _fail(f"{flag} must be a positive integer, got {value}")
    if args.out and Path(args.out).is_dir():
        return _fail(f"--out {args.out} is a folder; name a .json file to write")
    if args.cue_test and is_exported(args.model):
        return _fail(f"--cue-test needs the .keras model; {args.model} is an export")
    try:
        model, meta = load_any(args.model)
        index = _folder_index(args.data)
    except (FileNotFoundError, ModelFileError, ValueError) as exc:
        return _fail(exc)
    proba = predict_paths(model, index["path"].tolist(), args.batch_size,
                          verbose=sys.stderr.isatty())
    labels = index["label"].to_numpy()
    threshold = float(meta.get("threshold", 0.5))
    result = binary_metrics(labels, proba, threshold)
    result["ci"] = bootstrap_ci(labels, proba, threshold, n_boot=args.n_boot)
    if "temperature" in meta:
        result["calibrated"] = {
            "temperature": meta["temperature"],
            **calibration_summary(labels, apply_temperature(proba, meta["temperature"])),
        }
    if args.cue_test:
        from pneumo_utils.shortcuts import SELECTION_RULE, selection_score, validation_cue_test

        paths = index["path"].tolist()
        table = validation_cue_test(model, paths, labels, paths, labels, threshold,
                                    max_images=None, batch_size=args.batch_size)
        result["cue_test"] = table.round(4).to_dict(orient="index")
        result["selection_score"] = selection_score(table)
        result["selection_rule"] = SELECTION_RULE
    result.update(
        model=str(args.model),
        data=str(args.data),
        threshold_rule=meta.get("threshold_rule", "default 0.5 (no sidecar)"),
        skipped={"count": len(index.attrs["skipped"]), "files": index.attrs["skipped"]},
        nested_images=index.attrs["nested"],
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        try:
            write_json_atomic(args.out, result)
        except OSError as exc:
            return _fail(f"cannot write --out {args.out}: {exc}")
    return 0


def _fail(exc: Exception | str) -> int:
    """Print ``error: <message>`` as one line on stderr (no traceback); exit status 2."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
