"""A trained model's files: its ``.keras`` file, JSON sidecar and Markdown model card.

:class:`TrainedModel` holds a model of a notebook run and the facts its files state;
:func:`save_trained` writes the three files (:func:`~pneumo_utils.model.saving.save_model`,
:func:`~pneumo_utils.model.card.write_model_card`). The run's metrics JSON behind the index
page is :func:`pneumo_utils.explain.report.save_run`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras

from pneumo_utils.model.card import write_model_card
from pneumo_utils.model.input_check import InputCheck
from pneumo_utils.model.saving import model_metadata, save_model


@dataclass
class TrainedModel:
    """One trained model of a notebook run and the facts its files state about it.

    ``name`` is its row on the index page; ``weights`` a human description
    (:func:`pneumo_utils.explain.report.describe_weights`), so a backbone trained from random
    weights is never read as transfer learning; ``positive_class`` what label 1 means for a
    binary model (a model of more classes lists them); ``evaluation`` the dict of
    :func:`pneumo_utils.evaluation.metrics.evaluation_report` (decision rule, validation,
    test and external figures); ``facts`` anything else the sidecar and the index row carry
    (``training``, ``cue_test``, ``selection_score``, ``selection_rule``, ...);
    ``input_check`` the model's fitted :class:`~pneumo_utils.model.input_check.InputCheck`
    (saved in the sidecar; ``None``: the model answers any image, and its card says so) and
    ``screening`` its figures (:func:`pneumo_utils.evaluation.site_shift.screen`).
    """

    model: keras.Model
    path: Path
    name: str
    backbone: str
    weights: str
    positive_class: str
    evaluation: dict
    facts: dict = field(default_factory=dict)
    input_check: InputCheck | None = None
    screening: dict | None = None


def save_trained(
    trained: TrainedModel,
    *,
    data: str,
    class_names: Sequence[str],
    task: str | None,
    **sidecar,
) -> dict:
    """Save ``trained`` as ``trained.path`` (``.keras``, atomically), its JSON sidecar and its
    model card (``.md``, atomically); return the sidecar.

    The sidecar holds how outputs become decisions (a binary model's validation-chosen
    threshold and its rule; argmax for more classes), the temperature fitted on validation,
    the validation, test and external figures (less ROC points and risk-coverage curves),
    ``backbone``, ``weights``, ``data``, ``task`` (None writes none: a finding outside the
    Kermany tasks, such as an NIH one), ``class_names``, the uncertain band, input check and
    screening figures, the model's ``facts`` and ``sidecar`` (e.g. ``distribution``).
    """
    path, evaluation = Path(trained.path), trained.evaluation
    decision = {"threshold_rule": evaluation["threshold_rule"]}
    if evaluation.get("threshold") is not None:
        decision["threshold"] = evaluation["threshold"]
    meta = model_metadata(
        trained.model, **decision, temperature=evaluation.get("temperature", 1.0),
        metrics={"validation": evaluation["validation"], "test": evaluation["test"],
                 **({"external": _without_roc(evaluation["external"])} if evaluation.get("external") else {})},
        backbone=trained.backbone, weights=trained.weights, data=data, class_names=list(class_names),
        **({"task": task} if task is not None else {}), **trained.facts, **sidecar,
        **({"uncertain": evaluation["uncertain"]} if evaluation.get("uncertain") else {}),
        **({"input_check": trained.input_check.to_dict()} if trained.input_check else {}),
        **({"screening": trained.screening} if trained.screening else {}),
    )
    save_model(trained.model, path, meta)
    write_model_card(path.with_suffix(".md"), meta, evaluation)
    return meta


def _without_roc(figures: dict) -> dict:
    """``figures`` less its ROC points and risk-coverage curve, which the metrics JSON keeps
    for the index page and a sidecar does not need."""
    kept = {k: v for k, v in figures.items() if k != "roc"}
    if isinstance(kept.get("selective"), dict):
        kept["selective"] = {k: v for k, v in kept["selective"].items() if k != "risk_coverage"}
    return kept
