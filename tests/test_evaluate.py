"""Metrics agree with scikit-learn; thresholds, bootstrap CIs and calibration behave."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_utils import evaluate


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(predictions):
    y, p = predictions
    m = evaluate.binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)


def test_youden_threshold_maximises_j(predictions):
    y, p = predictions
    t = evaluate.choose_threshold(y, p, "youden")
    j = lambda thr: evaluate.binary_metrics(y, p, thr)["sensitivity"] + evaluate.binary_metrics(y, p, thr)["specificity"]  # noqa: E731
    assert all(j(t) >= j(other) - 1e-9 for other in np.linspace(0.05, 0.95, 37))


def test_threshold_rules():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.55, 0.8, 0.9])
    assert evaluate.choose_threshold(y, p, "fixed:0.3") == 0.3
    t95 = evaluate.choose_threshold(y, p, "sensitivity:1.0")
    assert evaluate.binary_metrics(y, p, t95)["sensitivity"] == 1.0
    assert evaluate.binary_metrics(y, p, evaluate.choose_threshold(y, p, "f1"))["f1"] >= 0.85
    with pytest.raises(ValueError, match="unknown threshold rule"):
        evaluate.choose_threshold(y, p, "magic")
    with pytest.raises(ValueError, match="both classes"):
        evaluate.choose_threshold(np.ones(4), np.linspace(0, 1, 4))


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n(predictions):
    y, p = predictions
    ci = evaluate.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)
    point = evaluate.binary_metrics(y, p, 0.5)
    for metric, (lo, hi) in ci.items():
        assert lo <= point[metric] <= hi, metric
    small = evaluate.bootstrap_ci(y[:60], p[:60], 0.5, n_boot=300, seed=0)
    assert (ci["auc"][1] - ci["auc"][0]) < (small["auc"][1] - small["auc"][0])
    assert ci == evaluate.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)


def test_calibration_and_temperature():
    rng = np.random.default_rng(1)
    true_p = rng.uniform(0.02, 0.98, 4000)
    y = (rng.uniform(size=4000) < true_p).astype(int)
    assert evaluate.expected_calibration_error(y, true_p) < 0.03
    logits = np.log(true_p / (1 - true_p))
    overconfident = 1 / (1 + np.exp(-3 * logits))
    assert evaluate.expected_calibration_error(y, overconfident) > 0.08
    t = evaluate.fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.15)
    fixed = evaluate.apply_temperature(overconfident, t)
    assert evaluate.expected_calibration_error(y, fixed) < 0.03
    assert skm.roc_auc_score(y, fixed) == pytest.approx(skm.roc_auc_score(y, overconfident))


def test_evaluation_report_uses_validation_threshold(predictions):
    y, p = predictions
    rep = evaluate.evaluation_report(y[200:], p[200:], y[:200], p[:200], "youden", n_boot=50)
    assert rep["threshold"] == evaluate.choose_threshold(y[:200], p[:200], "youden")
    assert rep["test"]["threshold"] == rep["threshold"] and rep["test_at_0.5"]["threshold"] == 0.5
    table = evaluate.metrics_table(rep)
    assert {"auc", "accuracy", "sensitivity", "specificity", "f1"} <= set(table.index)


def test_patient_bootstrap_is_wider_when_images_of_a_patient_agree():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(40), 10)
    y = np.repeat(rng.integers(0, 2, 40), 10)
    p = np.clip(np.repeat(0.3 * y[::10] + rng.normal(0.35, 0.2, 40), 10), 0, 1)
    by_image = evaluate.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)
    by_patient = evaluate.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0, groups=patients)
    width = lambda ci: ci["auc"][1] - ci["auc"][0]  # noqa: E731
    assert width(by_patient) > 1.8 * width(by_image)
    point = evaluate.binary_metrics(y, p, 0.5)["auc"]
    assert by_patient["auc"][0] <= point <= by_patient["auc"][1]


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.99, 1.1])
def test_bootstrap_resample_metrics_equal_binary_metrics(threshold):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    full = evaluate.binary_metrics(y, p, threshold)
    fast = evaluate._ci_metrics(y, p, threshold)
    assert set(fast) == set(evaluate.CI_METRICS)
    for name in evaluate.CI_METRICS:
        assert fast[name] == pytest.approx(full[name], abs=1e-12), name
