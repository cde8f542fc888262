"""The evaluation section every notebook ends with, and the files a run leaves behind.

Notebooks call these so that all four reports show the same things in the same way: the
threshold and how it was chosen on validation data, test metrics with bootstrap CIs, the
confusion matrix, per-class report, ROC/PR and calibration curves, Grad-CAM on right and
wrong test images, a model card, and the metrics JSON the index page is built from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from pneumo_utils import CLASS_NAMES, plots
from pneumo_utils.data import load_images
from pneumo_utils.evaluate import (
    apply_temperature,
    classification_table,
    evaluation_report,
    metrics_table,
)
from pneumo_utils.gradcam import grad_cam
from pneumo_utils.models import write_json_atomic

DISCLAIMER = (
    "**Not for diagnostic use.** This model is a research and teaching artefact. It has not "
    "been validated clinically, was trained on one public data set, and must not be used to "
    "make decisions about patients."
)


def show_evaluation(
    name: str,
    y_val: np.ndarray,
    proba_val: np.ndarray,
    y_test: np.ndarray,
    proba_test: np.ndarray,
    rule: str = "youden",
    n_boot: int = 1000,
    seed: int = 0,
    groups_test: np.ndarray | None = None,
) -> dict:
    """Compute and display the standard evaluation of one model; return the report dict.

    Pass the test images' patient ids as ``groups_test`` to bootstrap whole patients.

    Displays: the threshold rule and value, the metrics table (test with 95% bootstrap CIs
    at the validation-chosen threshold, test at 0.5, validation), the per-class report,
    the confusion matrix, ROC/PR curves and the reliability diagram.
    """
    report = evaluation_report(y_test, proba_test, y_val, proba_val, rule, n_boot, seed, groups_test)
    display(Markdown(
        f"**{name}** - decision threshold **{report['threshold']:.3f}**, chosen by "
        f"{report['threshold_rule']}; applied unchanged to the test split. "
        f"95% CIs: {report['ci_method']}."
    ))
    display(metrics_table(report))
    display(classification_table(y_test, proba_test, report["threshold"]))
    for figure in (
        plots.confusion_matrix(y_test, proba_test, report["threshold"], f"{name}: test"),
        plots.roc_pr_curves({f"{name} test": (y_test, proba_test), f"{name} validation": (y_val, proba_val)}),
        plots.reliability_diagram({
            f"{name} test": (y_test, proba_test),
            f"{name} test, temperature {report['temperature']:.2f}":
                (y_test, apply_temperature(proba_test, report["temperature"])),
        }),
    ):
        display(figure)
    calibrated = report["test_calibrated"]
    display(Markdown(
        f"Calibration: test Brier {report['test']['brier']:.3f}, ECE {report['test']['ece']:.3f}; "
        f"with temperature scaling fitted on validation (T = {report['temperature']:.2f}): "
        f"Brier {calibrated['brier']:.3f}, ECE {calibrated['ece']:.3f}. Temperature changes "
        "the probabilities shown, not the ranking (AUC) or the thresholded decisions."
    ))
    return report


def pick_examples(
    labels: np.ndarray, proba: np.ndarray, threshold: float, n_correct: int = 2, n_wrong: int = 2, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Row positions of confidently correct and of wrong predictions, with captions."""
    labels = np.asarray(labels)
    pred = (np.asarray(proba) >= threshold).astype(int)
    rng = np.random.default_rng(seed)
    chosen, captions = [], []
    for correct, n in ((True, n_correct), (False, n_wrong)):
        pool = np.flatnonzero((pred == labels) == correct)
        for i in rng.choice(pool, size=min(n, len(pool)), replace=False):
            chosen.append(int(i))
            verdict = "correct" if correct else "WRONG"
            captions.append(
                f"{verdict}: true {CLASS_NAMES[labels[i]]}, pred {CLASS_NAMES[pred[i]]} (p={proba[i]:.2f})"
            )
    return np.array(chosen, dtype=int), captions


def show_gradcam(model, paths: list[str], captions: list[str]):
    """Grad-CAM overlays for the given image files, one row each; returns the figure."""
    if not paths:
        display(Markdown("_No images to explain._"))
        return None
    size = int(model.inputs[0].shape[1])
    images = load_images(paths, size)
    figure = plots.gradcam_grid(images, grad_cam(model, images), captions)
    display(figure)
    return figure


def summary_line(report: dict) -> str:
    """One line of the headline test metrics with CIs."""
    t = report["test"]
    parts = [f"{m} {t[m]:.3f} [{t[m + '_ci'][0]:.3f}-{t[m + '_ci'][1]:.3f}]"
             for m in ("auc", "accuracy", "sensitivity", "specificity", "f1")]
    return ", ".join(parts)


def model_entry(name: str, report: dict, model_path: str | Path | None = None, **extra) -> dict:
    """The per-model record written to ``<run>.metrics.json`` and shown on the index page."""
    return {
        "name": name,
        "threshold": report["threshold"],
        "threshold_rule": report["threshold_rule"],
        "val_auc": report["validation"]["auc"],
        "test": report["test"],
        "test_at_0.5": report["test_at_0.5"],
        "model_path": str(model_path) if model_path else None,
        **extra,
    }


def write_metrics(
    path: str | Path, run_name: str, title: str, data: str, models: list[dict],
    task: str = "kermany", **extra,
) -> dict:
    """Write the run's metrics JSON (read by ``run_all.sh`` for ``reports/index.html``).

    ``task`` names what the models were trained and tested on (``"kermany"``, or
    ``"nih:<finding>"``); the run's best model is chosen among one task's models only, since
    validation AUCs of different data sets and findings do not compare.
    """
    best = max(models, key=lambda m: m["val_auc"])
    record = {
        "run_name": run_name, "title": title, "data": data, "task": task, **extra,
        "threshold": best["threshold"], "threshold_rule": best["threshold_rule"],
        "val_auc": best["val_auc"], "test": best["test"], "model_path": best["model_path"],
        "models": models,
    }
    write_json_atomic(path, record)
    return record


def model_card(meta: dict, report: dict) -> str:
    """A short model card (markdown): data and split, metrics with CIs, threshold, use, limits."""
    t = report["test"]
    rows = "\n".join(
        f"| {m} | {t[m]:.3f} | {t[m + '_ci'][0]:.3f} - {t[m + '_ci'][1]:.3f} |"
        for m in ("auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "brier")
    )
    return f"""# Model card: {meta.get('name', 'model')}

- **Architecture**: {meta.get('backbone', '?')} backbone, input {meta.get('image_size')} px RGB (0-255, preprocessing inside the model), sigmoid output = P(PNEUMONIA).
- **Weights**: {meta.get('weights', '?')}
- **Data and split**: {meta.get('data', '?')}
- **Decision threshold**: {report['threshold']:.4f} on the raw output, chosen by {report['threshold_rule']}.
- **Calibration**: test ECE {report['test']['ece']:.3f}; temperature {report.get('temperature', 1.0):.2f} fitted on validation gives ECE {report.get('test_calibrated', report['test'])['ece']:.3f}.
- **Intended use**: research and teaching on chest X-ray classification. **Not for diagnostic use.**

## Test metrics (95% bootstrap CIs, threshold above)
| metric | value | 95% CI |
|---|---|---|
{rows}

## Limitations
- Trained on one public data set; performance on images from other hospitals, scanners,
  populations (e.g. adults vs children) or acquisition protocols is unknown and usually lower.
- The test split is a held-out part of the same collection, not an external validation.
- Grad-CAM maps show what the model attends to, which may be shortcuts rather than pathology.
"""


def describe_split(index: pd.DataFrame) -> str:
    """One sentence with image and patient counts per split, for reports and sidecars."""
    parts = []
    for split in ("train", "val", "test"):
        part = index[index["split"] == split]
        if len(part):
            parts.append(
                f"{split}: {len(part)} images ({int(part['label'].sum())} PNEUMONIA) "
                f"from {part['patient'].nunique()} patients"
            )
    return "; ".join(parts)
