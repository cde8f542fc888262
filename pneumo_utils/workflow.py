"""Steps several notebooks take in the same way, one call each.

Preparing the patient-grouped Kermany split, listing files per split, saving a model with
its sidecar and model card, and putting several models' evaluations side by side. Kept
here so that no notebook copies another's code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data import assert_no_patient_leak, grouped_split, subsample
from pneumo_utils.datasets import load_kermany, paths_and_labels
from pneumo_utils.evaluate import CI_METRICS
from pneumo_utils.models import model_metadata, save_model
from pneumo_utils.report import model_card

SPLITS = ("train", "val", "test")


def kermany_split(
    data_dir: str | Path,
    val_fraction: float = 0.15,
    seed: int = 0,
    keep_official_val: bool = False,
    max_images_per_class: int | None = None,
) -> pd.DataFrame:
    """Index a Kermany folder and carve a patient-grouped validation split out of train.

    :func:`pneumo_utils.datasets.load_kermany` (every file decode-checked), then
    :func:`pneumo_utils.data.grouped_split` (official ``val/`` merged into train unless
    ``keep_official_val``), optional :func:`pneumo_utils.data.subsample`, and a check that
    no patient is in two splits. ``test/`` is left exactly as published.
    """
    index = load_kermany(data_dir)
    index = grouped_split(index, val_fraction, seed, keep_official_val=keep_official_val)
    index = subsample(index, max_images_per_class, seed)
    assert_no_patient_leak(index)
    return index


def split_files(
    index: pd.DataFrame, splits: Sequence[str] = SPLITS
) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """File paths and labels per split: ``({split: paths}, {split: labels})``."""
    pairs = {split: paths_and_labels(index, split) for split in splits}
    return {s: p for s, (p, _) in pairs.items()}, {s: y for s, (_, y) in pairs.items()}


def save_with_card(
    model: keras.Model, path: str | Path, evaluation: dict, **info
) -> dict:
    """Save ``model`` with its JSON sidecar and a markdown model card beside it.

    The sidecar holds the validation-chosen threshold and its rule, the validation and
    test metrics, and ``info`` (backbone, weights, data, training, ...). The card goes to
    ``path`` with suffix ``.md``. Returns the metadata.
    """
    path = Path(path)
    meta = model_metadata(
        model,
        threshold=evaluation["threshold"],
        threshold_rule=evaluation["threshold_rule"],
        temperature=evaluation.get("temperature", 1.0),
        metrics={"validation": evaluation["validation"], "test": evaluation["test"]},
        **info,
    )
    save_model(model, path, meta)
    path.with_suffix(".md").write_text(model_card(meta, evaluation))
    return meta


def comparison_table(evaluations: Mapping[str, dict]) -> pd.DataFrame:
    """Test metrics with 95% bootstrap CIs of several models, one column per model.

    Each cell reads ``value (low - high)``; the last rows give the validation AUC and the
    decision threshold each model chose on its own validation predictions.
    """
    columns = {}
    for name, report in evaluations.items():
        test = report["test"]
        cells = {m: f"{test[m]:.3f} ({test[m + '_ci'][0]:.3f} - {test[m + '_ci'][1]:.3f})"
                 for m in CI_METRICS}
        cells["validation auc"] = f"{report['validation']['auc']:.3f}"
        cells["threshold (from validation)"] = f"{report['threshold']:.3f}"
        columns[name] = cells
    table = pd.DataFrame(columns)
    table.index.name = "test metric (95% CI)"
    return table


def prediction_captions(
    labels: np.ndarray, rows: Sequence[int], predictions: Mapping[str, tuple[np.ndarray, float]]
) -> list[str]:
    """One caption per row: the true class, then a line per model with its probability of
    PNEUMONIA and whether its decision (at its own threshold) is right.

    ``predictions`` maps a model name to ``(probabilities, threshold)``.
    """
    captions = []
    for i in rows:
        lines = [f"true {CLASS_NAMES[int(labels[i])]}"]
        for name, (proba, threshold) in predictions.items():
            predicted = int(proba[i] >= threshold)
            mark = "ok" if predicted == int(labels[i]) else "WRONG"
            lines.append(f"{name}: p={proba[i]:.2f} {mark}")
        captions.append("\n".join(lines))
    return captions
