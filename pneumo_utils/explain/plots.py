"""Every figure the notebooks show. Each function returns a matplotlib Figure.

The curves and the confusion matrix are scikit-learn's displays. Figures of X-ray images
(:class:`PhotoFigure`) show as JPEG in a notebook, a fraction of a PNG's size, which keeps
each rendered report small; every other figure shows as PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.pipelines import load_images
from pneumo_utils.data.tasks import predicted_labels
from pneumo_utils.evaluation.metrics import expected_calibration_error

JPEG_QUALITY = 70
"""JPEG quality of image figures in notebooks: little visible loss on X-ray grids."""
PHOTO_DPI = 72
"""Resolution of image figures in notebooks. With :data:`JPEG_QUALITY` it keeps every report
under 1 MB: the largest, notebook 04's with four X-ray grids, measured 1.22 MB at quality 85 and
100 dpi, and about 0.93 MB re-encoded at these settings."""


class PhotoFigure(Figure):
    """A figure of photographs (X-ray grids, Grad-CAM overlays): a notebook shows it as JPEG."""


def show_photos_as_jpeg(quality: int = JPEG_QUALITY, dpi: int = PHOTO_DPI) -> None:
    """In IPython or Jupyter, display :class:`PhotoFigure` as JPEG instead of PNG.

    Registered for the subclass only, so the inline backend's own set-up (which resets the
    formats of ``Figure``) leaves it in place and other figures stay PNG. Does nothing
    outside IPython; called when this module is imported.
    """
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import print_figure
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    formatters["image/png"].for_type(PhotoFigure, lambda figure: None)
    formatters["image/jpeg"].for_type(
        PhotoFigure,
        partial(print_figure, fmt="jpeg", base64=True, dpi=dpi, pil_kwargs={"quality": quality}),
    )


show_photos_as_jpeg()


def sample_grid(images: np.ndarray, titles: Sequence[str], ncols: int = 4) -> plt.Figure:
    """A grid of images ``(n, h, w, 3)`` in 0-255 with one title each."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False,
                             FigureClass=PhotoFigure)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(title, fontsize=9)
    return _finish(fig)


def index_samples(
    index: pd.DataFrame,
    image_size: int = 224,
    per_class: int = 4,
    split: str = "train",
    class_names: Sequence[str] = CLASS_NAMES,
) -> plt.Figure:
    """The first ``per_class`` images of each class in ``split``, one row per class, titled with
    class and patient."""
    examples = index[index["split"] == split].groupby("label").head(per_class).sort_values("label", kind="stable")
    titles = [f"{class_names[y]} ({p})" for y, p in zip(examples["label"], examples["patient"], strict=True)]
    return sample_grid(load_images(examples["path"].tolist(), image_size), titles, ncols=per_class)


def class_distribution(index: pd.DataFrame, class_names: Sequence[str] = CLASS_NAMES) -> plt.Figure:
    """Images per class (``class_names`` in label order) in each split, as grouped bars with counts."""
    table = index.assign(cls=index["label"].map(dict(enumerate(class_names))))
    fig, ax = plt.subplots(figsize=(6 + len(class_names) - 2, 3.5))
    sns.countplot(
        data=table,
        x="split",
        hue="cls",
        hue_order=list(class_names),
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
    y_true: np.ndarray,
    proba: np.ndarray,
    threshold: float | None,
    title: str = "",
    class_names: Sequence[str] = CLASS_NAMES,
) -> plt.Figure:
    """Confusion matrix: counts and row percentages (share of each true class).

    ``proba`` ``(n,)`` is a binary model's output for class 1, predicted as class 1 when
    ``proba >= threshold``; ``(n, K)`` holds one probability per class, decided by argmax
    (``threshold`` None). Drawn by scikit-learn's ``ConfusionMatrixDisplay``.
    """
    y_pred = predicted_labels(proba, threshold)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(2.1 * k, 1.8 * k))
    display = ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(k)), display_labels=_wrapped(class_names), cmap="Blues",
        colorbar=False, ax=ax,
    )
    counts = display.confusion_matrix
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(f"{counts[i, j]}\n{shares[i, j]:.1%}")
    decided = "argmax (most probable class)" if threshold is None else f"threshold {threshold:.3f}"
    ax.set(xlabel="predicted", ylabel="true", title=title or decided)
    return _finish(fig)


def _wrapped(class_names: Sequence[str]) -> list[str]:
    """Class names with spaces as line breaks, so three long names fit under a matrix."""
    return [name.replace(" ", "\n") for name in class_names]


def roc_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str] = CLASS_NAMES
) -> plt.Figure:
    """ROC and precision-recall curves for one or more ``name -> (y_true, proba)``.

    scikit-learn's ``RocCurveDisplay`` and ``PrecisionRecallDisplay``; each legend entry
    carries the curve's AUC or average precision (AP). For ``(n, K)`` probabilities of K
    classes each class gets its one-vs-rest curve (that class against the others).
    """
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    first = True
    for name, (y, p) in curves.items():
        p = np.asarray(p)
        one_vs_rest = p.ndim == 2 and p.shape[1] > 1
        columns = range(p.shape[1]) if one_vs_rest else [None]
        for k in columns:
            label = f"{name}: {class_names[k]} vs rest" if one_vs_rest else name
            y_k, p_k = (np.asarray(y) == k, p[:, k]) if one_vs_rest else (y, p)
            RocCurveDisplay.from_predictions(y_k, p_k, name=label, ax=roc_ax, plot_chance_level=first)
            PrecisionRecallDisplay.from_predictions(y_k, p_k, name=label, ax=pr_ax)
            first = False
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall")
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.legend(loc="lower left", fontsize=8)
    return _finish(fig)


def reliability_diagram(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    n_bins: int = 10,
    class_names: Sequence[str] = CLASS_NAMES,
) -> plt.Figure:
    """Observed rate of class 1 against the mean predicted probability in ``n_bins`` equal-width
    bins (scikit-learn's ``CalibrationDisplay``), one curve per ``name -> (y_true, proba)``
    with its expected calibration error (ECE) in the legend. On the diagonal is perfect.

    For ``(n, K)`` probabilities the diagram is *top-label*: how often the most probable
    class is right against the probability given to it."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    top_label = False
    for i, (name, (y, p)) in enumerate(curves.items()):
        p = np.asarray(p)
        if p.ndim == 2 and p.shape[1] > 1:
            top_label = True
            y, p = (p.argmax(axis=1) == np.asarray(y)).astype(int), p.max(axis=1)
        ece = expected_calibration_error(y, p, n_bins)
        CalibrationDisplay.from_predictions(
            y, p, n_bins=n_bins, name=f"{name} (ECE {ece:.3f})", ax=ax, ref_line=i == 0
        )
    ax.set(
        xlabel="mean predicted probability" + (" of the predicted class" if top_label else ""),
        ylabel="observed accuracy" if top_label else f"observed {class_names[1]} rate",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8)
    return _finish(fig)


def risk_coverage(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float | None = None,
    band: dict | None = None,
    title: str = "Risk-coverage: refer the least certain to a reader",
) -> plt.Figure:
    """Selective classification: accuracy of the decided images against the share decided
    (coverage), deciding the most confident first, one curve per ``name -> (y_true, proba)``
    (``proba`` ``(n,)`` with the model's ``threshold``, or ``(n, K)``). With ``band`` (the
    ``uncertain`` record) each curve is marked where that band puts it, and the target
    accuracy is drawn."""
    from pneumo_utils.evaluation.selective import risk_coverage as curve_of
    from pneumo_utils.evaluation.selective import selective_report

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, (y, p) in curves.items():
        p = np.asarray(p)
        t = threshold if p.ndim == 1 else None
        curve = curve_of(y, p, t)
        line, = ax.plot(curve["coverage"], curve["accuracy"], label=name)
        if band and band.get("min_margin") is not None:
            at = selective_report(y, p, t, band)
            if at["accuracy_confident"] is not None:
                ax.plot([at["coverage"]], [at["accuracy_confident"]], "o", color=line.get_color(),
                        label=f"{name}: band gives {at['coverage']:.0%} decided, {at['accuracy_confident']:.3f} accurate")
    if band:
        ax.axhline(band["target_accuracy"], color="grey", linestyle=":", label=f"target {band['target_accuracy']:.0%}")
    ax.set(xlabel="coverage (share of images decided)", ylabel="accuracy of the decided images",
           title=title, xlim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    return _finish(fig)


def _finish(fig: plt.Figure) -> plt.Figure:
    """Lay out and close the figure: notebooks show it once, via ``display`` or as a cell's
    value, instead of a second time when the inline backend flushes open figures."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    plt.close(fig)
    return fig


def gradcam_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    *,
    probabilities: np.ndarray,
    titles: Sequence[str] | None = None,
    target: str = "predicted",
    threshold: float | None = 0.5,
    alpha: float = 0.45,
    class_names: Sequence[str] = CLASS_NAMES,
) -> plt.Figure:
    """Each image beside its Grad-CAM heat map, one row per image, with one colour bar.

    ``images`` are ``(n, h, w, 3)`` in 0-255, ``heatmaps`` the ``(n, h', w')`` maps in [0, 1]
    from :func:`pneumo_utils.explain.gradcam.grad_cam` (any resolution; drawn stretched over the
    image) and ``probabilities`` the model's output for class 1 on each image ``(n,)``, or
    one probability per class ``(n, K)``, shown in each caption below the optional
    ``titles``. ``target`` and ``threshold`` are the ones passed to ``grad_cam``: with
    ``"predicted"`` each map explains the class the model predicts (at ``threshold``, or the
    most probable of K classes), with ``"pneumonia"`` always class 1; the overlay's title
    says which.

    How to read it: red marks the regions whose features raised the score of the explained
    class most, blue regions that did not raise it (the colour bar runs from 0, no
    contribution, to 1, the strongest in *that* image: each map is scaled to its own peak, so
    colours do not compare between images). Grad-CAM shows where the model looked, not where
    the disease is: heat on text markers, the image border or outside the lungs means a
    shortcut. Its resolution is that of the last convolutional layer (7 x 7 for 224 px
    inputs to DenseNet121), so it is coarse by design.
    """
    n = len(images)
    titles = list(titles) if titles is not None else [""] * n
    if n == 0 or not len(heatmaps) == len(probabilities) == len(titles) == n:
        raise ValueError(
            f"gradcam_grid needs one heat map, probability and title per image; got {n} images, "
            f"{len(heatmaps)} heat maps, {len(probabilities)} probabilities, {len(titles)} titles"
        )
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 3.1 * n), squeeze=False, layout="constrained",
                             FigureClass=PhotoFigure)
    heat_image = None
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = predicted_labels(probabilities, threshold)
    for row, image, heat, p, pred, title in zip(axes, images, heatmaps, probabilities, predicted, titles,
                                                strict=True):
        picture = np.clip(image, 0, 255).astype(np.uint8)
        h, w = picture.shape[:2]
        explained = class_names[1] if target == "pneumonia" else class_names[pred]
        shown = f"P({class_names[pred]}) = {p[pred]:.2f}" if p.ndim else f"P({class_names[1]}) = {p:.2f}"
        caption = f"{title}\n{shown}".lstrip("\n")
        row[0].imshow(picture)
        row[0].set_title(caption, fontsize=9)
        row[1].imshow(picture)
        heat_image = row[1].imshow(
            np.asarray(heat, dtype=np.float32), cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear",
        )
        row[1].set_title(f"Grad-CAM: evidence for {explained}", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.colorbar(heat_image, ax=axes[:, 1], shrink=min(0.9, 0.3 + 0.6 / n),
                 label="Grad-CAM (0 none, 1 strongest in the image)")
    return _finish(fig)


def image_size_histogram(sizes: pd.DataFrame) -> plt.Figure:
    """Width and height distribution of the original files (``width``, ``height`` columns)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(sizes["width"], sizes["height"], s=6, alpha=0.5)
    ax.set(xlabel="width (px)", ylabel="height (px)", title="Original image sizes")
    return _finish(fig)
