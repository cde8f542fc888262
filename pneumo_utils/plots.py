"""Every figure the notebooks show. Each function returns a matplotlib Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from sklearn import metrics as skm

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data import load_images
from pneumo_utils.evaluate import expected_calibration_error
from pneumo_utils.gradcam import overlay


def sample_grid(images: np.ndarray, titles: Sequence[str], ncols: int = 4) -> plt.Figure:
    """A grid of images ``(n, h, w, 3)`` in 0-255 with one title each."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(title, fontsize=9)
    return _finish(fig)


def index_samples(index: pd.DataFrame, image_size: int = 224, per_class: int = 4, split: str = "train") -> plt.Figure:
    """The first ``per_class`` images of each class in ``split``, titled with class and patient."""
    examples = index[index["split"] == split].groupby("label").head(per_class)
    titles = [f"{CLASS_NAMES[y]} ({p})" for y, p in zip(examples["label"], examples["patient"], strict=True)]
    return sample_grid(load_images(examples["path"].tolist(), image_size), titles)


def class_distribution(index: pd.DataFrame) -> plt.Figure:
    """Images per class in each split, as grouped bars with counts."""
    table = index.assign(cls=index["label"].map(dict(enumerate(CLASS_NAMES))))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.countplot(
        data=table,
        x="split",
        hue="cls",
        hue_order=list(CLASS_NAMES),
        order=[s for s in ("train", "val", "test") if s in set(table["split"])],
        ax=ax,
    )
    for container in ax.containers:
        ax.bar_label(container, fontsize=8)
    ax.set(title="Images per class and split", xlabel="", ylabel="images")
    ax.legend(title="")
    return _finish(fig)


def training_curves(
    history: Mapping[str, Sequence[float]], metrics: Sequence[str] = ("loss", "auc")
) -> plt.Figure:
    """Train and validation curves per metric; phase changes (fine-tuning) as dashed lines."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    epochs = np.arange(1, len(history[metrics[0]]) + 1)
    phases = history.get("phase")
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(epochs, history[metric], "o-", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        if phases:
            for i in range(1, len(phases)):
                if phases[i] != phases[i - 1]:
                    ax.axvline(i + 0.5, ls="--", c="grey", label="fine-tuning starts")
        ax.set(title=metric, xlabel="epoch")
        ax.legend()
    return _finish(fig)


def confusion_matrix(
    y_true: np.ndarray, proba: np.ndarray, threshold: float, title: str = ""
) -> plt.Figure:
    """Confusion-matrix heat map at ``threshold`` (counts and row percentages)."""
    y_pred = (np.asarray(proba) >= threshold).astype(int)
    cm = skm.confusion_matrix(y_true, y_pred, labels=[0, 1])
    pct = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    labels = np.array(
        [[f"{c}\n{p:.1%}" for c, p in zip(r, q, strict=True)] for r, q in zip(cm, pct, strict=True)]
    )
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    sns.heatmap(
        cm,
        annot=labels,
        fmt="",
        cmap="Blues",
        cbar=False,
        ax=ax,
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
    )
    ax.set(xlabel="predicted", ylabel="true", title=title or f"threshold {threshold:.3f}")
    return _finish(fig)


def roc_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> plt.Figure:
    """ROC and precision-recall curves for one or more ``name -> (y_true, proba)``."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (y, p) in curves.items():
        fpr, tpr, _ = skm.roc_curve(y, p)
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})")
        precision, recall, _ = skm.precision_recall_curve(y, p)
        pr_ax.plot(recall, precision, label=f"{name} (AP {skm.average_precision_score(y, p):.3f})")
    roc_ax.plot([0, 1], [0, 1], ls=":", c="grey")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall")
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.legend(loc="lower left", fontsize=8)
    return _finish(fig)


def reliability_diagram(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 10
) -> plt.Figure:
    """Observed PNEUMONIA rate against mean predicted probability per bin, with ECE."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    for name, (y, p) in curves.items():
        observed, predicted = _calibration_bins(np.asarray(y), np.asarray(p), n_bins)
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot(predicted, observed, "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed PNEUMONIA rate",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8)
    return _finish(fig)


def _finish(fig: plt.Figure) -> plt.Figure:
    """Lay out and close the figure: notebooks show it once, via ``display`` or as a cell's
    value, instead of a second time when the inline backend flushes open figures."""
    fig.tight_layout()
    plt.close(fig)
    return fig


def _calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    used = [b for b in range(n_bins) if (bins == b).any()]
    return (
        np.array([y[bins == b].mean() for b in used]),
        np.array([p[bins == b].mean() for b in used]),
    )


def gradcam_grid(
    images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], alpha: float = 0.4
) -> plt.Figure:
    """Each image beside its Grad-CAM overlay; one row per image."""
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for row, image, heat, title in zip(axes, images, heatmaps, titles, strict=True):
        row[0].imshow(np.clip(image, 0, 255).astype(np.uint8))
        row[0].set_title(title, fontsize=9)
        row[1].imshow(overlay(image, heat, alpha))
        row[1].set_title("Grad-CAM", fontsize=9)
        for ax in row:
            ax.axis("off")
    return _finish(fig)


def image_size_histogram(sizes: pd.DataFrame) -> plt.Figure:
    """Width and height distribution of the original files (``width``, ``height`` columns)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(sizes["width"], sizes["height"], s=6, alpha=0.5)
    ax.set(xlabel="width (px)", ylabel="height (px)", title="Original image sizes")
    return _finish(fig)
