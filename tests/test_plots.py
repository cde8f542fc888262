"""Figures: scikit-learn's displays draw what the reports show, Grad-CAM figures carry a colour
bar and the model's probability, and X-ray figures display as compact JPEG in a notebook."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell
from matplotlib.colorbar import Colorbar
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score
from synthetic import synthetic_xray

from pneumo_utils.explain import plots


@pytest.fixture()
def scores():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    proba = np.clip(0.3 * y + rng.uniform(0.0, 0.7, len(y)), 0.0, 1.0)
    return y, proba


def _xrays(n: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack([synthetic_xray(i % 2, rng, size) for i in range(n)]).astype(np.float32)


def test_confusion_matrix_counts_and_row_shares(scores):
    y, proba = scores
    fig = plots.confusion_matrix(y, proba, threshold=0.5, class_names=("NORMAL", "EFFUSION"))
    ax = fig.axes[0]
    predicted = (proba >= 0.5).astype(int)
    tn = int(((y == 0) & (predicted == 0)).sum())
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == f"{tn}\n{tn / 60:.1%}"
    assert sum(int(t.split("\n")[0]) for t in texts) == len(y)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NORMAL", "EFFUSION"]
    assert len(ax.images) == 1 and len(fig.axes) == 1  # the matrix, no colour bar
    assert ax.get_title() == "threshold 0.500"


def test_roc_pr_curves_one_curve_per_model_with_its_score(scores):
    y, proba = scores
    fig = plots.roc_pr_curves({"a": (y, proba), "b": (y, 1.0 - proba)})
    roc_ax, pr_ax = fig.axes
    roc_labels = [t.get_text() for t in roc_ax.get_legend().get_texts()]
    assert f"a (AUC = {roc_auc_score(y, proba):.2f})" in roc_labels
    assert f"b (AUC = {roc_auc_score(y, 1.0 - proba):.2f})" in roc_labels
    assert len(roc_ax.lines) == 3  # two curves and one chance line
    pr_labels = [t.get_text() for t in pr_ax.get_legend().get_texts()]
    assert f"a (AP = {average_precision_score(y, proba):.2f})" in pr_labels
    assert len(pr_ax.lines) == 2
    fpr, tpr = roc_ax.lines[0].get_data()
    assert fpr[0] == 0.0 and tpr[-1] == 1.0


def test_reliability_diagram_bins_match_calibration_curve(scores):
    y, proba = scores
    fig = plots.reliability_diagram({"model": (y, proba), "flat": (y, np.full(len(y), 0.5))},
                                    n_bins=5, class_names=("NORMAL", "EFFUSION"))
    ax = fig.axes[0]
    observed, predicted = calibration_curve(y, proba, n_bins=5)
    curve = ax.lines[1]  # after the one reference line
    np.testing.assert_allclose(curve.get_xdata(), predicted)
    np.testing.assert_allclose(curve.get_ydata(), observed)
    assert len(ax.lines) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("model (ECE ") for label in labels)
    assert ax.get_ylabel() == "observed EFFUSION rate"


def test_gradcam_grid_has_colour_bar_and_probabilities():
    images = _xrays(3)
    heat = np.random.default_rng(2).uniform(0, 1, (3, 7, 7)).astype(np.float32)
    fig = plots.gradcam_grid(images, heat, probabilities=[0.91, 0.12, 0.5],
                             titles=["correct", "WRONG", "correct"])
    assert isinstance(fig, plots.PhotoFigure)
    colour_bars = [ax for ax in fig.axes if isinstance(getattr(ax, "_colorbar", None), Colorbar)]
    assert len(colour_bars) == 1 and len(fig.axes) == 3 * 2 + 1
    overlays = [fig.axes[i].images[1] for i in (1, 3, 5)]
    assert colour_bars[0]._colorbar.mappable in overlays  # one scale, shared by every row
    assert all(o.get_clim() == (0.0, 1.0) and o.get_cmap().name == "jet" for o in overlays)
    captions = [fig.axes[i].get_title() for i in (0, 2, 4)]
    assert captions == ["correct\nP(PNEUMONIA) = 0.91", "WRONG\nP(PNEUMONIA) = 0.12",
                        "correct\nP(PNEUMONIA) = 0.50"]
    explained = [fig.axes[i].get_title() for i in (1, 3, 5)]
    assert explained == ["Grad-CAM: evidence for PNEUMONIA", "Grad-CAM: evidence for NORMAL",
                         "Grad-CAM: evidence for PNEUMONIA"]
    # the heat map is stretched over the whole image, whatever its own resolution
    assert overlays[0].get_extent() == [-0.5, 63.5, 63.5, -0.5]


def test_gradcam_grid_explains_the_target_it_is_told():
    fig = plots.gradcam_grid(_xrays(1), np.ones((1, 4, 4)), probabilities=[0.2],
                             target="pneumonia", class_names=("NORMAL", "EFFUSION"))
    assert fig.axes[0].get_title() == "P(EFFUSION) = 0.20"
    assert fig.axes[1].get_title() == "Grad-CAM: evidence for EFFUSION"


def test_gradcam_grid_names_the_class_predicted_at_the_threshold_given():
    fig = plots.gradcam_grid(_xrays(2), np.ones((2, 4, 4)), probabilities=[0.3, 0.1], threshold=0.25)
    assert [fig.axes[i].get_title() for i in (1, 3)] == [
        "Grad-CAM: evidence for PNEUMONIA", "Grad-CAM: evidence for NORMAL"]


def test_gradcam_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one heat map, probability and title per image"):
        plots.gradcam_grid(_xrays(2), np.ones((2, 4, 4)), probabilities=[0.3])


@pytest.fixture()
def shell():
    ip = InteractiveShell.instance()
    yield ip
    InteractiveShell.clear_instance()


def test_xray_figures_display_as_jpeg_in_a_notebook(shell):
    plots.show_photos_as_jpeg()
    grid = plots.sample_grid(_xrays(8, size=128), [f"image {i}" for i in range(8)])
    data, _ = shell.display_formatter.format(grid)
    assert "image/png" not in data
    jpeg = base64.b64decode(data["image/jpeg"])
    assert jpeg[:3] == b"\xff\xd8\xff"
    from IPython.core.pylabtools import print_figure

    png = print_figure(grid, fmt="png")
    assert len(jpeg) < len(png) / 3, (len(jpeg), len(png))
    curves = plots.training_curves({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]}, metrics=("loss",))
    assert not isinstance(curves, plots.PhotoFigure)
    assert "image/jpeg" not in shell.display_formatter.format(curves)[0]


THREE = ("NORMAL", "BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA")


@pytest.fixture()
def three_class_scores():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 30)
    logits = rng.normal(0.0, 1.0, (len(y), 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_three_class_confusion_matrix_decides_by_argmax(three_class_scores):
    y, proba = three_class_scores
    fig = plots.confusion_matrix(y, proba, threshold=None, class_names=THREE)
    ax = fig.axes[0]
    counts = np.array([int(t.get_text().split("\n")[0]) for t in ax.texts]).reshape(3, 3)
    expected = np.array([[np.sum((y == i) & (proba.argmax(1) == j)) for j in range(3)] for i in range(3)])
    assert np.array_equal(counts, expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NORMAL", "BACTERIAL\nPNEUMONIA", "VIRAL\nPNEUMONIA"]
    assert ax.get_title() == "argmax (most probable class)"


def test_three_class_roc_has_one_vs_rest_curve_per_class(three_class_scores):
    y, proba = three_class_scores
    fig = plots.roc_pr_curves({"test": (y, proba)}, class_names=THREE)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for k, name in enumerate(THREE):
        assert f"test: {name} vs rest (AUC = {roc_auc_score(y == k, proba[:, k]):.2f})" in labels


def test_three_class_reliability_is_top_label(three_class_scores):
    y, proba = three_class_scores
    fig = plots.reliability_diagram({"test": (y, proba)}, n_bins=5, class_names=THREE)
    ax = fig.axes[0]
    observed, predicted = calibration_curve(proba.argmax(1) == y, proba.max(1), n_bins=5)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), observed)
    assert ax.get_ylabel() == "observed accuracy"


def test_three_class_gradcam_grid_names_the_most_probable_class():
    proba = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    fig = plots.gradcam_grid(_xrays(2), np.ones((2, 4, 4)), probabilities=proba, threshold=None, class_names=THREE)
    assert fig.axes[0].get_title() == "P(VIRAL PNEUMONIA) = 0.70"
    assert [fig.axes[i].get_title() for i in (1, 3)] == [
        "Grad-CAM: evidence for VIRAL PNEUMONIA", "Grad-CAM: evidence for NORMAL"]
