"""An interactive threshold and error explorer for a binary model, built on ipywidgets.

``explorer(...)`` shows, for several labelled sets side by side (validation, test, external
validation), what a decision threshold does: the confusion matrix, sensitivity, specificity and
accuracy of each set, updated as a slider moves, with buttons that put the slider on the
thresholds that matter (the one chosen on validation, one calibrated on a site). Below, an
error gallery: the images a set gets wrong at the current threshold (false positives or false
negatives, the most confident mistakes first), each with its probability and its Grad-CAM
overlay, so a reader sees which images the model gets wrong and where it looked.

ipywidgets renders in JupyterLab, Colab and VS Code. A rendered HTML report has no kernel to
move a slider, so the object also carries a static version (``text/html``: the same tables at
the threshold it was given, and the gallery of its mistakes), which the runner's report
template shows instead of the widget.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from pneumo_utils import CLASS_NAMES

ERROR_KINDS = {"false positives": (0, 1), "false negatives": (1, 0)}
"""Error type -> (true label, predicted label)."""


def table_at(sets: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]], threshold: float,
             class_names: Sequence[str] = CLASS_NAMES) -> str:
    """An HTML table of each set's confusion matrix and rates at ``threshold`` (the raw
    output's): one column per set; rows TP, FN, TN, FP, sensitivity, specificity, accuracy."""
    rows: dict[str, list[str]] = {k: [] for k in ("images", "true positives", "false negatives", "true negatives",
                                                  "false positives", "sensitivity", "specificity", "accuracy")}
    for _, labels, proba in sets.values():
        y = np.asarray(labels).astype(int)
        predicted = (np.asarray(proba, dtype=float) >= threshold).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
        rate = lambda a, b: f"{a / (a + b):.3f}" if a + b else "–"  # noqa: E731
        for key, value in (("images", len(y)), ("true positives", tp), ("false negatives", fn),
                           ("true negatives", tn), ("false positives", fp), ("sensitivity", rate(tp, fn)),
                           ("specificity", rate(tn, fp)), ("accuracy", rate(tp + tn, fp + fn))):
            rows[key].append(str(value))
    head = "".join(f"<th>{html.escape(name)}</th>" for name in sets)
    body = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                   for k, values in rows.items())
    return (f"<table class='pneumo-explorer'><tr><th>threshold {threshold:.4f}<br><small>positive: "
            f"{html.escape(class_names[1])}</small></th>{head}</tr>{body}</table>")


def errors_at(labels: np.ndarray, proba: np.ndarray, threshold: float, kind: str, limit: int) -> np.ndarray:
    """Rows of the ``kind`` errors (:data:`ERROR_KINDS`) at ``threshold``, most confident first."""
    truth, said = ERROR_KINDS[kind]
    y, p = np.asarray(labels).astype(int), np.asarray(proba, dtype=float)
    rows = np.nonzero((y == truth) & ((p >= threshold).astype(int) == said))[0]
    distance = np.abs(p[rows] - threshold)
    return rows[np.argsort(-distance, kind="stable")][:limit]


def gallery(paths: Sequence[str], labels: np.ndarray, proba: np.ndarray, threshold: float, kind: str, *,
            model=None, image_size: int | None = None, limit: int = 8, class_names: Sequence[str] = CLASS_NAMES):
    """A figure of the ``kind`` errors at ``threshold`` with probabilities and, given the Keras
    ``model``, Grad-CAM overlays of the predicted class; ``None`` when there are none."""
    from pneumo_utils.data.pipelines import load_images
    from pneumo_utils.explain import plots

    rows = errors_at(labels, proba, threshold, kind, limit)
    if not len(rows):
        return None
    size = image_size or (int(model.inputs[0].shape[1]) if model is not None else 224)
    images = load_images([paths[i] for i in rows], size)
    titles = [f"{kind[:-1]}: true {class_names[int(labels[i])]}" for i in rows]
    if model is None:
        return plots.sample_grid(images, [f"{t}, P = {proba[i]:.3f}" for t, i in zip(titles, rows, strict=True)])
    from pneumo_utils.explain.gradcam import grad_cam

    heatmaps = grad_cam(model, images, threshold=threshold)
    return plots.gradcam_grid(images, heatmaps, probabilities=np.asarray(proba)[rows], titles=titles,
                              threshold=threshold, class_names=class_names)


def _figure_html(figure) -> str:
    if figure is None:
        return "<p>none at this threshold</p>"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="jpeg", dpi=72, pil_kwargs={"quality": 70}, bbox_inches="tight")
    return f"<img alt='error gallery' src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'/>"


class Explorer:
    """The explorer of :func:`explorer`: ``widget`` (an ipywidgets box) and ``static_html``.

    Displayed in a live kernel it is the widget; its ``text/html`` (what a rendered report
    shows) is the static version at the threshold it was built with."""

    def __init__(self, widget, static_html: str, slider, table) -> None:
        self.widget, self.static_html, self.slider, self.table = widget, static_html, slider, table

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        return {**bundle, "text/html": self.static_html}


def explorer(
    sets: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
    *,
    threshold: float,
    marks: Mapping[str, float] | None = None,
    model=None,
    image_size: int | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    limit: int = 8,
    static_gallery: str | None = None,
) -> Explorer:
    """The threshold and error explorer for a binary model.

    ``sets`` maps a name (``"validation"``, ``"test"``, ``"external validation"``) to
    ``(paths, labels (n,), P(positive) (n,))``; ``threshold`` is where the slider starts (the
    model's own, on its raw output); ``marks`` names other thresholds worth a button (e.g.
    ``{"calibrated on A": 0.41}``); ``model`` (the Keras model) adds Grad-CAM to the error
    gallery, ``limit`` images at most. The static version shows the tables at ``threshold``
    and the errors of ``static_gallery`` (a set's name; default the last set).
    """
    import ipywidgets as widgets
    from IPython.display import display

    if not sets:
        raise ValueError("the explorer needs at least one labelled set")
    names = list(sets)
    marks = {f"model's own ({threshold:.4f})": threshold, **{f"{k} ({v:.4f})": v for k, v in (marks or {}).items()}}
    slider = widgets.FloatSlider(value=float(threshold), min=0.0, max=1.0, step=0.0005, readout_format=".4f",
                                 description="threshold", continuous_update=False,
                                 layout=widgets.Layout(width="640px"))
    buttons = []
    for label, value in marks.items():
        button = widgets.Button(description=label, tooltip=f"set the threshold to {value:.4f}",
                                layout=widgets.Layout(width="auto"))
        button.on_click(lambda _, v=value: setattr(slider, "value", float(v)))
        buttons.append(button)
    table = widgets.HTML(table_at(sets, threshold, class_names))
    slider.observe(lambda change: setattr(table, "value", table_at(sets, change["new"], class_names)), names="value")

    which = widgets.Dropdown(options=names, value=names[-1], description="set")
    kind = widgets.ToggleButtons(options=list(ERROR_KINDS), description="errors")
    show = widgets.Button(description="show errors", button_style="info")
    out = widgets.Output()

    def draw(_=None) -> None:
        paths, labels, proba = sets[which.value]
        figure = gallery(paths, labels, proba, slider.value, kind.value, model=model, image_size=image_size,
                         limit=limit, class_names=class_names)
        out.clear_output(wait=True)
        with out:
            display(figure if figure is not None else widgets.HTML(
                f"No {kind.value} in {which.value} at threshold {slider.value:.4f}."))

    show.on_click(draw)
    box = widgets.VBox([
        widgets.HTML("<b>Decision threshold</b>: move the slider or pick a marked threshold."),
        slider, widgets.HBox(buttons), table,
        widgets.HTML("<b>Error gallery</b>: the set's mistakes at the current threshold, most confident "
                     "first, with Grad-CAM of the predicted class."),
        widgets.HBox([which, show]), kind, out,
    ])
    shown = static_gallery or names[-1]
    paths, labels, proba = sets[shown]
    static = (f"<div class='pneumo-explorer-static'><p><b>Threshold explorer</b> (static: the report was "
              f"rendered without a kernel; run the notebook to move the threshold). Marked thresholds: "
              f"{html.escape(', '.join(marks))}.</p>{table_at(sets, threshold, class_names)}"
              + "".join(f"<p><b>{html.escape(k.capitalize())} in {html.escape(shown)}</b> at {threshold:.4f}, most "
                        f"confident first:</p>{_figure_html(gallery(paths, labels, proba, threshold, k, model=model, image_size=image_size, limit=limit, class_names=class_names))}"
                        for k in ERROR_KINDS)
              + "</div>")
    return Explorer(box, static, slider, table)
