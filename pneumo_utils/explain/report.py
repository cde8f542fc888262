"""What a notebook run leaves behind, and the small tables its report shows.

One call (:func:`save_run`) saves a run's models, each with its JSON sidecar and markdown
model card, and the run's metrics JSON the index page is built from. Also the one-sentence
split summary, the choice of test images for Grad-CAM, and the side-by-side table of several
models' test metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.tasks import DEFAULT_TASK, predicted_labels
from pneumo_utils.evaluation.metrics import CI_METRICS
from pneumo_utils.files import write_json_atomic, write_text_atomic
from pneumo_utils.model.input_check import InputCheck
from pneumo_utils.model.saving import model_metadata, save_model


def describe_weights(weights_file: str | None) -> str:
    """A human description of a backbone's starting weights for sidecars and the index page."""
    return f"ImageNet ({Path(weights_file).name})" if weights_file else "random initialisation"


def describe_split(index: pd.DataFrame, class_names: Sequence[str] = CLASS_NAMES) -> str:
    """One sentence with image, per-class and patient counts per split, for sidecars and reports.

    Two classes name the positive count only (``"625 images (391 PNEUMONIA)"``); more classes
    name every class's count."""
    parts = []
    for split in ("train", "val", "test"):
        part = index[index["split"] == split]
        if len(part):
            counts = part["label"].value_counts()
            named = [class_names[1]] if len(class_names) == 2 else list(class_names)
            classes = ", ".join(f"{int(counts.get(class_names.index(name), 0))} {name}" for name in named)
            parts.append(f"{split}: {len(part)} images ({classes}) from {part['patient'].nunique()} patients")
    return "; ".join(parts)


def pick_examples(
    *,
    labels: np.ndarray,
    proba: np.ndarray,
    threshold: float | None,
    n_correct: int = 2,
    n_wrong: int = 2,
    seed: int = 0,
    class_names: Sequence[str] = CLASS_NAMES,
) -> tuple[np.ndarray, list[str]]:
    """Row positions of randomly chosen correct and wrong predictions, with captions.

    ``proba`` is a binary model's output ``(n,)`` decided at ``threshold``, or ``(n, K)``
    class probabilities decided by argmax (``threshold`` None). Captions read
    ``correct: true NORMAL, pred NORMAL`` (the figure adds the model's output). Fewer rows
    come back when a pool is smaller than asked for.
    """
    labels = np.asarray(labels)
    pred = predicted_labels(proba, threshold)
    rng = np.random.default_rng(seed)
    chosen, captions = [], []
    for correct, n in ((True, n_correct), (False, n_wrong)):
        pool = np.flatnonzero((pred == labels) == correct)
        for i in rng.choice(pool, size=min(n, len(pool)), replace=False):
            chosen.append(int(i))
            verdict = "correct" if correct else "WRONG"
            captions.append(f"{verdict}: true {class_names[labels[i]]}, pred {class_names[pred[i]]}")
    return np.array(chosen, dtype=int), captions


def prediction_captions(
    *,
    labels: np.ndarray,
    rows: Sequence[int],
    predictions: Mapping[str, tuple[np.ndarray, float]],
    class_names: Sequence[str] = CLASS_NAMES,
) -> list[str]:
    """One caption per row: the true class, then a line per model with its output for class 1
    and whether its decision (at its own threshold) is right.

    ``predictions`` maps a model name to ``(probabilities, threshold)``.
    """
    captions = []
    for i in rows:
        lines = [f"true {class_names[int(labels[i])]}"]
        for name, (proba, threshold) in predictions.items():
            mark = "ok" if int(proba[i] >= threshold) == int(labels[i]) else "WRONG"
            lines.append(f"{name}: p={proba[i]:.2f} {mark}")
        captions.append("\n".join(lines))
    return captions


def comparison_table(evaluations: Mapping[str, dict]) -> pd.DataFrame:
    """Test metrics with 95% bootstrap CIs of several models, one column per model.

    Each cell reads ``value (low - high)``; then, for models scored on external validation
    (``evaluation["external"]``), its AUC, accuracy, sensitivity and specificity; the last rows
    give the validation AUC and the decision threshold each model chose on its own validation
    predictions.
    """
    columns = {}
    for name, evaluation in evaluations.items():
        test = evaluation["test"]
        cells = {m: f"{test[m]:.3f} ({test[m + '_ci'][0]:.3f} - {test[m + '_ci'][1]:.3f})"
                 for m in CI_METRICS}
        external = evaluation.get("external") or {}
        cells.update({f"external {m}": f"{external[m]:.3f} ({external[m + '_ci'][0]:.3f} - "
                                       f"{external[m + '_ci'][1]:.3f})"
                      for m in ("auc", "accuracy", "sensitivity", "specificity") if m in external})
        cells["validation auc"] = f"{evaluation['validation']['auc']:.3f}"
        cells["threshold (from validation)"] = f"{evaluation['threshold']:.3f}"
        columns[name] = cells
    table = pd.DataFrame(columns)
    table.index.name = "metric (95% CI)"
    return table


@dataclass
class TrainedModel:
    """One trained model of a notebook run and the facts its files state about it.

    ``name`` is its row on the index page; ``weights`` a human description
    (:func:`describe_weights`), so a backbone trained from random weights is never read as
    transfer learning; ``positive_class`` what label 1 means for a binary model (a model of
    more classes lists them); ``evaluation`` the dict of
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


def save_run(
    models: Sequence[TrainedModel],
    *,
    metrics_path: str | Path,
    run_name: str,
    title: str,
    data: str,
    task: str | None = DEFAULT_TASK,
    class_names: Sequence[str] = CLASS_NAMES,
    data_set: str = "kermany",
    **sidecar,
) -> list[dict]:
    """Save a run's models and its metrics: for each model its ``.keras`` file (atomically),
    JSON sidecar and markdown model card (``.md``), then ``metrics_path``, the run's metrics
    JSON that the runner builds ``index.html`` from.

    Each sidecar holds how outputs become decisions (a binary model's validation-chosen
    threshold and its rule; argmax for more classes), the temperature fitted on validation,
    the validation, test and external figures, ``backbone``, ``weights``, ``data``, ``task``
    (None for a finding outside the Kermany tasks, such as an NIH one), ``class_names``, the
    model's ``facts`` and ``sidecar`` (e.g. ``distribution``). The metrics JSON's ``task`` is
    ``data_set`` for the default task (``"kermany"``; ``"nih:<finding>"`` for NIH) and
    ``"<data_set>:<task>"`` for the others: the best model is chosen among one task's models
    only, since scores of different tasks do not compare. Its top level repeats the entry with
    the highest validation AUC. Returns the sidecars, in the order of ``models``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", str(run_name)):
        raise ValueError(f"run_name {run_name!r} must be a plain name of letters, digits, _ . - "
                         "(it names the run's files; no folders)")
    class_names = list(class_names)
    described = {"task": task} if task is not None else {}
    metas, entries = [], []
    for trained in models:
        path, evaluation = Path(trained.path), trained.evaluation
        decision = {"threshold_rule": evaluation["threshold_rule"]}
        if evaluation.get("threshold") is not None:
            decision["threshold"] = evaluation["threshold"]
        meta = model_metadata(
            trained.model, **decision, temperature=evaluation.get("temperature", 1.0),
            metrics={"validation": evaluation["validation"], "test": evaluation["test"],
                     **({"external": _without_roc(evaluation["external"])} if evaluation.get("external") else {})},
            backbone=trained.backbone, weights=trained.weights, data=data, class_names=class_names,
            **described, **trained.facts, **sidecar,
            **({"uncertain": evaluation["uncertain"]} if evaluation.get("uncertain") else {}),
            **({"input_check": trained.input_check.to_dict()} if trained.input_check else {}),
            **({"screening": trained.screening} if trained.screening else {}),
        )
        save_model(trained.model, path, meta)
        write_text_atomic(path.with_suffix(".md"), model_card(meta, evaluation))
        metas.append(meta)
        entries.append({
            "name": trained.name, "backbone": trained.backbone, "weights": trained.weights,
            "positive_class": trained.positive_class,
            "threshold": evaluation.get("threshold"), "threshold_rule": evaluation["threshold_rule"],
            "decision": evaluation.get("decision", "threshold"),
            "val_auc": evaluation["validation"]["auc"], "validation": evaluation["validation"],
            "test": evaluation["test"], "test_at_0.5": evaluation.get("test_at_0.5"),
            "external": evaluation.get("external"), "roc": evaluation.get("roc"), "model_path": str(path),
            "uncertain": evaluation.get("uncertain"), "selective": evaluation.get("selective"),
            "screening": trained.screening,
            **described, "class_names": class_names, **trained.facts,
        })
    best = max(entries, key=lambda m: m["val_auc"])
    write_json_atomic(metrics_path, {
        "run_name": run_name, "title": title, "data": data,
        "task": data_set if task in (None, DEFAULT_TASK) else f"{data_set}:{task}",
        "class_names": class_names,
        **{k: best[k] for k in ("threshold", "threshold_rule", "decision", "val_auc", "test", "model_path",
                                "weights", "positive_class")},
        "models": entries,
    })
    return metas


def _without_roc(figures: dict) -> dict:
    """``figures`` less its ROC points and risk-coverage curve, which the metrics JSON keeps
    for the index page and a sidecar does not need."""
    kept = {k: v for k, v in figures.items() if k != "roc"}
    if isinstance(kept.get("selective"), dict):
        kept["selective"] = {k: v for k, v in kept["selective"].items() if k != "risk_coverage"}
    return kept


def model_card(meta: dict, evaluation: dict) -> str:
    """A short model card (markdown): data and split, metrics with CIs, decision rule, use, limits.

    Binary models state their threshold and rule; models of more classes state that the most
    probable class wins and add per-class precision/recall/F1 and the confusion matrix."""
    t = evaluation["test"]
    names = list(meta.get("class_names", CLASS_NAMES))
    binary = evaluation.get("threshold") is not None
    shown = [m for m in (*CI_METRICS, "balanced_accuracy", "macro_f1", "weighted_f1") if f"{m}_ci" in t]
    label = {"auc": "auc" if binary else "auc (macro one-vs-rest)"}
    rows = "\n".join(f"| {label.get(m, m)} | {t[m]:.3f} | {t[m + '_ci'][0]:.3f} - {t[m + '_ci'][1]:.3f} |"
                      for m in shown)
    calibrated = evaluation.get("test_calibrated", t)
    loading = ("`import pneumo_utils.model.preprocessing` first (it registers the `pneumo>HistogramEqualization` layer), "
               "then `keras.models.load_model(path)`" if meta.get("custom_layers")
               else "`keras.models.load_model(path)`; nothing to import")
    if binary:
        output = f"sigmoid output = P({names[1]}); below the threshold: {names[0]}"
        decision = (f"- **Decision threshold**: {evaluation['threshold']:.4f} on the raw output, chosen by "
                    f"{evaluation['threshold_rule']}.")
        per_class = ""
    else:
        output = f"softmax output, one probability each for {', '.join(names)}"
        decision = "- **Decision**: the most probable class (argmax); there is no threshold to choose."
        per_class = _per_class_section(t, names)
    task = f"\n- **Task**: {meta['task']} ({', '.join(names)})" if meta.get("task") else ""
    cue = ""
    if meta.get("cue_test"):
        columns = [c for c in ("auc", "sensitivity", "specificity", "balanced accuracy", "flipped")
                   if all(c in row for row in meta["cue_test"].values())]
        cue_rows = "\n".join(
            f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |"
            for name, row in meta["cue_test"].items()
        )
        cue = f"""
## Shortcut check (validation images, decision rule above)
Each validation image with its grey-level histogram or its outer frame taken from an image of
another class, or its frame blanked (`pneumo_utils.evaluation.shortcuts`). Selection score
{meta.get('selection_score', float('nan')):.3f}: {meta.get('selection_rule', '')}.

| images | {' | '.join(columns)} |
|---|{'---|' * len(columns)}
{cue_rows}
"""
    return f"""# Model card: {meta.get('name', 'model')}
{task}
- **Architecture**: {meta.get('backbone', '?')}, input {meta.get('image_size')} px RGB (0-255, preprocessing inside the model), {output}.
- **Weights**: {meta.get('weights', '?')}
- **Data and split**: {meta.get('data', '?')}
- **Training**: {meta.get('training', '?')}
{decision}
- **Calibration**: test ECE {t['ece']:.3f}; temperature {evaluation.get('temperature', 1.0):.2f} fitted on validation gives ECE {calibrated['ece']:.3f}.
- **Loading**: {loading}.
- **Intended use**: research and teaching on chest X-ray classification. **Not for diagnostic use.**

## Test metrics (95% bootstrap CIs, decision rule above)
| metric | value | 95% CI |
|---|---|---|
{rows}
{per_class}{_external_section(evaluation)}{_screening_section(meta, evaluation)}{cue}
## Limitations
- Trained on one public data set; performance on images from other hospitals, scanners,
  populations (e.g. adults vs children) or acquisition protocols is unknown and usually lower.
- The test split is a held-out part of the same collection, not an external validation{
  "; the external validation above is one other collection, small, and says nothing of others"
  if evaluation.get("external") else ""}.
- Grad-CAM maps show what the model attends to, which may be shortcuts rather than pathology.
"""


def _external_section(evaluation: dict) -> str:
    """The model card's external-validation section (empty without one)."""
    external = evaluation.get("external")
    if not external:
        return "\n## External validation\nNone: no labelled external validation set was found for this run.\n"
    shown = [m for m in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "macro_f1")
             if m in external and f"{m}_ci" in external]
    rows = "\n".join(f"| {m} | {external[m]:.3f} | {external[m + '_ci'][0]:.3f} - {external[m + '_ci'][1]:.3f} |"
                     for m in shown)
    counts = ", ".join(f"{n} {name}" for name, n in external.get("counts", {}).items())
    return f"""
## External validation ({external.get('data', '?')}; {counts})
{external.get('note', '')[:1].upper() + external.get('note', '')[1:]}. 95% CIs: {external.get('ci_method', '')}.

| metric | value | 95% CI |
|---|---|---|
{rows}
"""


def _screening_section(meta: dict, evaluation: dict) -> str:
    """The model card's section on what the model does not know: its input check, its
    abstention band, and the site-shift test of the external validation set."""
    record, band = meta.get("input_check"), evaluation.get("uncertain")
    if record is None:
        check = ("- **Input check**: none. This model answers every image, photographs "
                 "included; `predict` says so.")
    else:
        flagged = (meta.get("screening") or {}).get("flagged", {})
        shares = ", ".join(f"{name} {share:.1%}" for name, share in flagged.items() if share is not None)
        views = record["views"]
        check = (f"- **Input check** (probabilistic-PCA Mahalanobis distance, fitted on {record['fitted_on']}: "
                 f"{views['features']['components']} directions of the {views['features']['width']} pooled "
                 f"features, limit {views['features']['limit']:.2f}; {views['thumbnail']['components']} of the "
                 f"8 x 8 grey thumbnail, limit {views['thumbnail']['limit']:.2f}): an image beyond either "
                 f"limit is not assessed ({record['limit_rule']}). Share beyond a limit: "
                 f"{shares or 'not measured'}.")
    if not band:
        refer = "- **Uncertain answers**: none (too few validation images to choose a band)."
    elif not band.get("reachable"):
        refer = (f"- **Uncertain answers**: none; no band reaches {band['target_accuracy']:.0%} accurate "
                 f"decisions on {band['chosen_on']}.")
    else:
        selective = evaluation.get("selective") or {}
        test = (f" On test: coverage {selective['coverage']:.1%}, accuracy of the decided images "
                f"{selective['accuracy_confident']:.3f} (all images {selective['accuracy_all']:.3f})."
                if selective.get("accuracy_confident") is not None else "")
        shown = (f"P between {band['low']:.4f} and {band['high']:.4f}" if "low" in band
                 else f"top probability below {band['min_margin']:.4f}")
        refer = (f"- **Uncertain answers** (refer to a reader): {shown}, a band chosen on "
                 f"{band['chosen_on']} for decisions at least {band['target_accuracy']:.0%} accurate "
                 f"(coverage there {band['coverage']:.1%}).{test}")
    shift = (meta.get("screening") or {}).get("site_shift")
    site = ""
    if shift:
        site = (f"- **Site shift** ({shift['data']}): {shift['flagged']:.1%} beyond the limit; MMD "
                f"permutation p = {shift['p_value']:.3g}. {shift['verdict'][:1].upper()}{shift['verdict'][1:]}.")
    return f"\n## What the model does not know\n{check}\n{refer}\n{site}\n"


def _per_class_section(test: dict, names: Sequence[str]) -> str:
    """Per-class precision/recall/F1/support and the confusion matrix of a multi-class test."""
    per_class = test.get("per_class", {})
    lines = "\n".join(
        f"| {name} | {per_class[name]['precision']:.3f} | {per_class[name]['recall']:.3f} | "
        f"{per_class[name]['f1']:.3f} | {int(per_class[name]['support'])} | {test['auc_per_class'][name]:.3f} |"
        for name in names if name in per_class
    )
    matrix = test.get("confusion_matrix", [])
    header = " | ".join(f"pred {name}" for name in names)
    cells = "\n".join(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |"
                      for name, row in zip(names, matrix, strict=False))
    return f"""
## Per class (test)
| class | precision | recall | F1 | images | one-vs-rest AUC |
|---|---|---|---|---|---|
{lines}

| true \\ predicted | {header} |
|---|{'---|' * len(names)}
{cells}
"""
