"""Metrics agree with scikit-learn; thresholds, bootstrap CIs and calibration behave."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_utils.evaluation import metrics


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(predictions):
    y, p = predictions
    m = metrics.binary_metrics(y, p, threshold=0.5)
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
    t = metrics.choose_threshold(y, p, "youden")
    j = lambda thr: metrics.binary_metrics(y, p, thr)["sensitivity"] + metrics.binary_metrics(y, p, thr)["specificity"]  # noqa: E731
    assert all(j(t) >= j(other) - 1e-9 for other in np.linspace(0.05, 0.95, 37))


def test_threshold_rules():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.55, 0.8, 0.9])
    assert metrics.choose_threshold(y, p, "fixed:0.3") == 0.3
    t95 = metrics.choose_threshold(y, p, "sensitivity:1.0")
    assert metrics.binary_metrics(y, p, t95)["sensitivity"] == 1.0
    assert metrics.binary_metrics(y, p, metrics.choose_threshold(y, p, "f1"))["f1"] >= 0.85
    with pytest.raises(ValueError, match="unknown threshold rule"):
        metrics.choose_threshold(y, p, "magic")
    for rule in ("fixed:5", "fixed:-0.5", "fixed:nan", "fixed:abc", "sensitivity:2", "sensitivity:0"):
        with pytest.raises(ValueError, match="is not a"):
            metrics.choose_threshold(y, p, rule)
    with pytest.raises(ValueError, match="both classes"):
        metrics.choose_threshold(np.ones(4), np.linspace(0, 1, 4))


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n(predictions):
    y, p = predictions
    ci = metrics.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)
    point = metrics.binary_metrics(y, p, 0.5)
    for metric, (lo, hi) in ci.items():
        assert lo <= point[metric] <= hi, metric
    small = metrics.bootstrap_ci(y[:60], p[:60], 0.5, n_boot=300, seed=0)
    assert (ci["auc"][1] - ci["auc"][0]) < (small["auc"][1] - small["auc"][0])
    assert ci == metrics.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)


def test_calibration_and_temperature():
    rng = np.random.default_rng(1)
    true_p = rng.uniform(0.02, 0.98, 4000)
    y = (rng.uniform(size=4000) < true_p).astype(int)
    assert metrics.expected_calibration_error(y, true_p) < 0.03
    logits = np.log(true_p / (1 - true_p))
    overconfident = 1 / (1 + np.exp(-3 * logits))
    assert metrics.expected_calibration_error(y, overconfident) > 0.08
    t = metrics.fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.15)
    fixed = metrics.apply_temperature(overconfident, t)
    assert metrics.expected_calibration_error(y, fixed) < 0.03
    assert skm.roc_auc_score(y, fixed) == pytest.approx(skm.roc_auc_score(y, overconfident))


def test_evaluation_report_uses_validation_threshold(predictions):
    y, p = predictions
    rep = metrics.evaluation_report(y[200:], p[200:], y[:200], p[:200], "youden", n_boot=50)
    assert rep["threshold"] == metrics.choose_threshold(y[:200], p[:200], "youden")
    assert rep["test"]["threshold"] == rep["threshold"] and rep["test_at_0.5"]["threshold"] == 0.5
    table = metrics.metrics_table(rep)
    assert {"auc", "accuracy", "sensitivity", "specificity", "f1"} <= set(table.index)


def test_patient_bootstrap_is_wider_when_images_of_a_patient_agree():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(40), 10)
    y = np.repeat(rng.integers(0, 2, 40), 10)
    p = np.clip(np.repeat(0.3 * y[::10] + rng.normal(0.35, 0.2, 40), 10), 0, 1)
    by_image = metrics.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0)
    by_patient = metrics.bootstrap_ci(y, p, 0.5, n_boot=300, seed=0, groups=patients)
    width = lambda ci: ci["auc"][1] - ci["auc"][0]  # noqa: E731
    assert width(by_patient) > 1.8 * width(by_image)
    point = metrics.binary_metrics(y, p, 0.5)["auc"]
    assert by_patient["auc"][0] <= point <= by_patient["auc"][1]


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.99, 1.1])
def test_binary_metrics_equal_scikit_learn(threshold):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    full = metrics.binary_metrics(y, p, threshold)
    pred = (p >= threshold).astype(int)
    expected = {
        "auc": skm.roc_auc_score(y, p), "pr_auc": skm.average_precision_score(y, p),
        "accuracy": skm.accuracy_score(y, pred),
        "sensitivity": skm.recall_score(y, pred, zero_division=0),
        "specificity": skm.recall_score(1 - y, 1 - pred, zero_division=0),
        "precision": skm.precision_score(y, pred, zero_division=0),
        "f1": skm.f1_score(y, pred, zero_division=0), "brier": skm.brier_score_loss(y, p),
    }
    assert set(expected) == set(metrics.CI_METRICS)
    for name, value in expected.items():
        assert full[name] == pytest.approx(value, abs=1e-12), name


# --------------------------------------------------------------------------- three classes

NAMES = ("NORMAL", "BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA")
HAND_Y = np.array([0, 0, 1, 1, 2, 2])
HAND_P = np.array([
    [0.7, 0.2, 0.1],  # NORMAL, right
    [0.3, 0.6, 0.1],  # NORMAL read as BACTERIAL
    [0.2, 0.7, 0.1],  # BACTERIAL, right
    [0.1, 0.3, 0.6],  # BACTERIAL read as VIRAL
    [0.1, 0.1, 0.8],  # VIRAL, right
    [0.2, 0.2, 0.6],  # VIRAL, right
])


def test_multiclass_metrics_equal_hand_computed_values():
    m = metrics.multiclass_metrics(HAND_Y, HAND_P, NAMES)
    assert m["n"] == 6 and m["class_counts"] == dict.fromkeys(NAMES, 2)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    # one-vs-rest AUC as the share of (positive, negative) pairs ranked right, ties half:
    # NORMAL 8/8; BACTERIAL 0.3 loses to one NORMAL row's 0.6: 7/8; VIRAL 0.6 ties one: 7.5/8
    assert m["auc_per_class"] == pytest.approx(dict(zip(NAMES, (1.0, 0.875, 0.9375), strict=True)))
    assert m["auc"] == pytest.approx((1.0 + 0.875 + 0.9375) / 3)
    assert m["auc_weighted"] == pytest.approx(m["auc"])  # equal supports
    precision, recall = (1.0, 0.5, 2 / 3), (0.5, 0.5, 1.0)
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    for c, name in enumerate(NAMES):
        assert m["per_class"][name] == pytest.approx(
            {"precision": precision[c], "recall": recall[c], "f1": f1[c], "support": 2})
    assert m["macro_precision"] == pytest.approx(np.mean(precision))
    assert m["macro_recall"] == pytest.approx(np.mean(recall))
    assert m["macro_f1"] == pytest.approx(np.mean(f1)) and m["weighted_f1"] == pytest.approx(np.mean(f1))
    # Brier: per image the sum over classes of (p - one-hot)^2, then the mean
    assert m["brier"] == pytest.approx((0.14 + 0.86 + 0.14 + 0.86 + 0.06 + 0.24) / 6)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.7, 0.3, 0.8, 0.6])))
    # top-label ECE: confidence 0.6 x3 (1 of 3 right), 0.7 x2 (both right), 0.8 x1 (right)
    assert m["ece"] == pytest.approx(3 / 6 * abs(1 / 3 - 0.6) + 2 / 6 * 0.3 + 1 / 6 * 0.2)


def test_multiclass_metrics_refuse_what_is_not_softmax_output():
    with pytest.raises(ValueError, match="summing to 1"):
        metrics.multiclass_metrics(HAND_Y, HAND_P * 2, NAMES)
    with pytest.raises(ValueError, match=r"\(6, 3\)"):
        metrics.multiclass_metrics(HAND_Y, HAND_P[:, :2], NAMES)
    with pytest.raises(ValueError, match="labels must be 0..2"):
        metrics.multiclass_metrics(HAND_Y + 1, HAND_P, NAMES)
    missing = metrics.multiclass_metrics(HAND_Y[:4], HAND_P[:4], NAMES)
    assert np.isnan(missing["auc"]) and np.isnan(missing["auc_per_class"]["VIRAL PNEUMONIA"])
    assert missing["auc_per_class"]["NORMAL"] == pytest.approx(1.0)


@pytest.fixture
def softmax_predictions():
    """600 images of three classes; logits favour the true class, with ties in the scores."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), y] += 1.2
    logits = np.round(logits, 1)  # ties, which the rank AUC must count half as scikit-learn does
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


def test_bootstrap_resample_metrics_equal_multiclass_metrics(softmax_predictions):
    y, p = softmax_predictions
    for rows in (slice(None), slice(0, 40)):
        full = metrics.multiclass_metrics(y[rows], p[rows], NAMES)
        fast = metrics._multiclass_ci_metrics(*metrics._check_multiclass(y[rows], p[rows], NAMES), 3)
        assert set(fast) == set(metrics.MULTICLASS_CI_METRICS)
        for name in metrics.MULTICLASS_CI_METRICS:
            assert fast[name] == pytest.approx(full[name], abs=1e-12), name


def test_multiclass_bootstrap_brackets_the_estimate_and_widens_with_patients(softmax_predictions):
    y, p = softmax_predictions
    ci = metrics.multiclass_bootstrap_ci(y, p, n_boot=300, seed=0)
    point = metrics.multiclass_metrics(y, p, NAMES)
    assert set(ci) == set(metrics.MULTICLASS_CI_METRICS)
    for metric, (lo, hi) in ci.items():
        assert lo < point[metric] < hi, metric
    assert ci == metrics.multiclass_bootstrap_ci(y, p, n_boot=300, seed=0)
    small = metrics.multiclass_bootstrap_ci(y[:60], p[:60], n_boot=300, seed=0)
    assert ci["auc"][1] - ci["auc"][0] < small["auc"][1] - small["auc"][0]
    # 60 patients of 10 images each, all alike: resampling images would be far too sure
    patients = np.repeat(np.arange(60), 10)
    y_p, p_p = np.repeat(y[:60], 10), np.repeat(p[:60], 10, axis=0)
    by_image = metrics.multiclass_bootstrap_ci(y_p, p_p, n_boot=300, seed=0)
    by_patient = metrics.multiclass_bootstrap_ci(y_p, p_p, n_boot=300, seed=0, groups=patients)
    width = lambda c: c["macro_f1"][1] - c["macro_f1"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_image)


def test_multiclass_evaluation_report_decides_by_argmax(softmax_predictions):
    y, p = softmax_predictions
    overconfident = metrics.softmax(3 * np.log(p))
    rep = metrics.evaluation_report(y[300:], overconfident[300:], y[:300], overconfident[:300], n_boot=50)
    assert rep["class_names"] == list(NAMES) and rep["decision"] == "argmax"
    assert rep["threshold"] is None and "argmax" in rep["threshold_rule"]
    assert rep["temperature"] == pytest.approx(3.0, rel=0.25)
    assert rep["test_calibrated"]["ece"] < rep["test"]["ece"]
    assert np.array(rep["test"]["confusion_matrix"]).shape == (3, 3)
    for m in metrics.MULTICLASS_CI_METRICS:
        lo, hi = rep["test"][f"{m}_ci"]
        assert lo <= rep["test"][m] <= hi, m
    table = metrics.metrics_table(rep)
    assert {"accuracy", "macro_f1", "auc VIRAL PNEUMONIA vs rest"} <= set(table.index)
    report = metrics.classification_table(y, p)
    assert list(report.index[:3]) == list(NAMES)
    assert report.loc["VIRAL PNEUMONIA", "recall"] == pytest.approx(
        metrics.multiclass_metrics(y, p, NAMES)["per_class"]["VIRAL PNEUMONIA"]["recall"], abs=1e-4)
    with pytest.raises(ValueError, match=r"shape \(600, 2\)"):
        metrics.evaluation_report(y, p[:, :2], y, p[:, :2])


def test_binary_report_names_its_classes_and_decision(predictions):
    y, p = predictions
    rep = metrics.evaluation_report(y[200:], p[200:], y[:200], p[:200], n_boot=20,
                                     class_names=["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"])
    assert rep["decision"] == "threshold" and rep["class_names"] == ["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"]
    table = metrics.classification_table(y, p, rep["threshold"], class_names=rep["class_names"])
    assert "VIRAL PNEUMONIA" in table.index
    with pytest.raises(ValueError, match="threshold"):
        metrics.classification_table(y, p)


def test_softmax_temperature_keeps_the_decision():
    rng = np.random.default_rng(0)
    p = metrics.softmax(rng.normal(0, 2, (50, 3)))
    np.testing.assert_allclose(metrics.apply_softmax_temperature(p, 1.0), p, atol=1e-9)
    softer = metrics.apply_softmax_temperature(p, 2.5)
    assert np.array_equal(softer.argmax(axis=1), p.argmax(axis=1))
    assert np.all(softer.max(axis=1) <= p.max(axis=1) + 1e-12)
    np.testing.assert_allclose(softer.sum(axis=1), 1.0)


def test_roc_points_trace_the_curve_whose_area_is_the_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    proba = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    roc = metrics.roc_points(y, proba)
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
    assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])
    assert skm.auc(roc["fpr"], roc["tpr"]) == pytest.approx(skm.roc_auc_score(y, proba), abs=1e-3)
    assert len(roc["fpr"]) < 300  # collinear points dropped
    assert metrics.roc_points(np.zeros(5), np.linspace(0, 1, 5)) == {"fpr": [], "tpr": []}
    report = metrics.evaluation_report(y, proba, y, proba, n_boot=20)
    assert report["roc"] == roc and "roc" not in report["test"]
    assert metrics.external_report(y, proba, threshold=0.5, data="site", n_boot=20)["roc"] == roc
