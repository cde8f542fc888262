"""A saved model's card: the Markdown beside its ``.keras`` file and sidecar.

The card says what the model is for and where it stops: task, architecture, starting weights,
data and split, how an output becomes a decision, test metrics with CIs, external
validation, what the model does not know (input check, uncertain band, site shift), the
shortcut check and the limits of all of these. Its text is the jinja2 template
``templates/model_card.md.j2``, shipped as package data; this module picks the figures it shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jinja2

from pneumo_utils import CLASS_NAMES
from pneumo_utils.files import write_text_atomic

MULTICLASS_LABELS = {"auc": "auc (macro one-vs-rest)"}
"""How a card of three or more classes names a metric whose multi-class meaning differs."""

CUE_COLUMNS = ("auc", "sensitivity", "specificity", "balanced accuracy", "flipped")
"""Columns of the shortcut-check table, shown when every row of ``cue_test`` has them."""


def _sentence(text: str) -> str:
    """``text`` with its first letter upper-case and the rest kept (jinja's ``capitalize``
    lower-cases the rest, which would spoil names such as ``NIH``)."""
    return text[:1].upper() + text[1:]


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pneumo_utils.model", "templates"),
    undefined=jinja2.StrictUndefined,  # a misspelt field fails the render, never a blank
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # Markdown, not HTML
)
def _figure(value: float | jinja2.Undefined) -> float:
    """``value``, or for a figure missing from the sidecar or evaluation the error naming it
    (a :class:`jinja2.StrictUndefined` raises it when made a string; a number format would
    raise a nameless ``TypeError``)."""
    if isinstance(value, jinja2.Undefined):
        str(value)
    return value


_TEMPLATES.filters.update(
    fixed=lambda value, digits: f"{_figure(value):.{digits}f}",
    percent=lambda value, digits: f"{_figure(value):.{digits}%}",
    sentence=_sentence,
)


def model_card(meta: dict, evaluation: dict) -> str:
    """The model card (Markdown) of a model with sidecar ``meta`` and evaluation ``evaluation``.

    ``evaluation`` is the dict of :func:`pneumo_utils.evaluation.metrics.evaluation_report`
    (``threshold`` None for a model of three or more classes), with ``external`` when the
    model was scored on a labelled external set. A binary card states its threshold and how
    it was chosen; a card of more classes says that the most probable class wins and adds
    per-class precision, recall and F1 and the confusion matrix. Test metrics are those with a
    bootstrap CI (``<metric>_ci``), in the order the evaluation gives them.
    """
    test = evaluation["test"]
    names = list(meta.get("class_names", CLASS_NAMES))
    binary = evaluation.get("threshold") is not None
    labels = {} if binary else MULTICLASS_LABELS
    external = evaluation.get("external") or None
    per_class = test.get("per_class", {})
    screening = meta.get("screening") or {}
    cue = None
    if meta.get("cue_test"):
        columns = [c for c in CUE_COLUMNS if all(c in row for row in meta["cue_test"].values())]
        cue = {"columns": columns,
               "rows": [(name, [row[c] for c in columns]) for name, row in meta["cue_test"].items()]}
    return _TEMPLATES.get_template("model_card.md.j2").render(
        meta=meta,
        evaluation=evaluation,
        names=names,
        binary=binary,
        test=test,
        test_rows=_metric_rows(test, labels),
        calibrated_ece=evaluation.get("test_calibrated", test)["ece"],
        per_class=[(name, per_class[name]) for name in names if name in per_class],
        confusion=list(zip(names, test.get("confusion_matrix", []), strict=False)),
        external=external,
        external_rows=_metric_rows(external or {}, labels, kept=(
            "auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "macro_f1")),
        external_counts=", ".join(f"{n} {name}" for name, n in (external or {}).get("counts", {}).items()),
        input_check=meta.get("input_check"),
        flagged=[(name, share) for name, share in screening.get("flagged", {}).items() if share is not None],
        band=evaluation.get("uncertain"),
        selective=evaluation.get("selective") or {},
        shift=screening.get("site_shift"),
        cue=cue,
        nan=float("nan"),
    )


def write_model_card(path: str | Path, meta: dict, evaluation: dict) -> Path:
    """Write :func:`model_card` to ``path`` atomically (a planted symlink there is replaced,
    never followed) and return ``path``."""
    return write_text_atomic(path, model_card(meta, evaluation))


def _metric_rows(figures: dict, labels: dict, kept: Sequence[str] | None = None) -> list[tuple]:
    """``(label, value, (low, high))`` of each metric in ``figures`` with a ``<metric>_ci``,
    in the order of the intervals (only those in ``kept`` when given)."""
    shown = [key.removesuffix("_ci") for key in figures if key.endswith("_ci")]
    return [(labels.get(m, m), figures[m], figures[f"{m}_ci"]) for m in shown
            if m in figures and (kept is None or m in kept)]
