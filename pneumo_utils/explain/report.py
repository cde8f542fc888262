"""What a notebook run leaves behind, and the small tables its report shows.

One call (:func:`save_run`) saves a run's models (each with its JSON sidecar and Markdown
model card, :func:`pneumo_utils.model.run_record.save_trained`) and writes the run's metrics
JSON the index page is built from. Also the one-sentence split summary, the choice of test
images for Grad-CAM, and the side-by-side table of several models' test metrics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.tasks import DEFAULT_TASK, predicted_labels
from pneumo_utils.evaluation.metrics import CI_METRICS
from pneumo_utils.files import write_json_atomic
from pneumo_utils.model.run_record import TrainedModel, save_trained


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
    """Save a run's models and its metrics: each model's ``.keras`` file, JSON sidecar and
    Markdown model card (:func:`~pneumo_utils.model.run_record.save_trained`, given ``data``,
    ``task``, ``class_names`` and ``sidecar``), then ``metrics_path``, the run's metrics JSON
    that the runner builds ``index.html`` from.

    The metrics JSON's ``task`` is ``data_set`` for the default task (``"kermany"``;
    ``"nih:<finding>"`` for NIH) and ``"<data_set>:<task>"`` for the others: the best model is
    chosen among one task's models only, since scores of different tasks do not compare. Its
    top level repeats the entry with the highest validation AUC. Returns the sidecars, in the
    order of ``models``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", str(run_name)):
        raise ValueError(f"run_name {run_name!r} must be a plain name of letters, digits, _ . - "
                         "(it names the run's files; no folders)")
    class_names = list(class_names)
    described = {"task": task} if task is not None else {}
    metas, entries = [], []
    for trained in models:
        evaluation = trained.evaluation
        metas.append(save_trained(trained, data=data, class_names=class_names, task=task, **sidecar))
        entries.append({
            "name": trained.name, "backbone": trained.backbone, "weights": trained.weights,
            "positive_class": trained.positive_class,
            "threshold": evaluation.get("threshold"), "threshold_rule": evaluation["threshold_rule"],
            "decision": evaluation.get("decision", "threshold"),
            "val_auc": evaluation["validation"]["auc"], "validation": evaluation["validation"],
            "test": evaluation["test"], "test_at_0.5": evaluation.get("test_at_0.5"),
            "external": evaluation.get("external"), "roc": evaluation.get("roc"),
            "model_path": str(Path(trained.path)),
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
