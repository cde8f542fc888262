"""Patient-grouped, seeded, leak-checked splits of the index table.

See :mod:`pneumo_utils.data.datasets` for the index (one row per image: path, label, patient,
split, source). :func:`kermany_split` builds the index of a Kermany folder and splits it;
everything else takes the index and never looks at folders again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pneumo_utils.data.datasets import paths_and_labels
from pneumo_utils.data.kermany import load_kermany

SPLITS = ("train", "val", "test")


class PatientLeakError(AssertionError):
    """A patient appears in more than one split."""


def grouped_split(
    index: pd.DataFrame,
    val_fraction: float = 0.15,
    seed: int = 0,
    source_split: str = "train",
    keep_official_val: bool = False,
) -> pd.DataFrame:
    """Carve a patient-grouped, class-stratified validation split out of ``source_split``.

    Kermany's official ``val`` holds only 16 images, far too few to choose a threshold or to
    early-stop on; a validation set carved from train by *patient* is both larger and honest
    (no patient's images on both sides). The official val images are merged into train
    unless ``keep_official_val`` is true, in which case they stay in ``val`` too.

    Parameters
    ----------
    index : the index table.
    val_fraction : fraction of ``source_split`` patients moved to ``val`` (0 < f < 1).
    seed : seeds the fold assignment.

    Returns a copy of the index with an updated ``split`` column.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    out = index.copy()
    if not keep_official_val:
        out.loc[out["split"] == "val", "split"] = source_split
    pool = out[out["split"] == source_split]
    n_splits = max(2, round(1.0 / val_fraction))
    if pool["patient"].nunique() < n_splits:
        raise ValueError(
            f"{pool['patient'].nunique()} patients in split {source_split!r} are too few for "
            f"a validation fraction of {val_fraction}; lower it or add data."
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_rows = next(folds.split(pool, pool["label"], groups=pool["patient"]))
    out.loc[pool.index[val_rows], "split"] = "val"
    assert_no_patient_leak(out)
    return out


def assert_no_patient_leak(index: pd.DataFrame) -> None:
    """Raise :class:`PatientLeakError` when any patient id is in two or more splits."""
    per_patient = index.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        examples = ", ".join(map(str, leaked.index[:5]))
        raise PatientLeakError(f"{len(leaked)} patient(s) appear in several splits: {examples}")


def subsample(index: pd.DataFrame, max_per_class: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``max_per_class`` images per (split, class), sampled reproducibly.

    For quick runs; ``None`` returns the index unchanged.
    """
    if max_per_class is None:
        return index
    parts = [
        group.sample(n=min(len(group), max_per_class), random_state=seed)
        for _, group in index.groupby(["split", "label"], sort=True)
    ]
    return pd.concat(parts).sort_index()


def kermany_split(
    data_dir: str | Path,
    val_fraction: float = 0.15,
    seed: int = 0,
    keep_official_val: bool = False,
    max_images_per_class: int | None = None,
) -> pd.DataFrame:
    """Index a Kermany folder and carve a patient-grouped validation split out of train.

    :func:`pneumo_utils.data.kermany.load_kermany` (every file decode-checked), then
    :func:`grouped_split` (official ``val/`` merged into train unless ``keep_official_val``),
    :func:`subsample` to ``max_images_per_class`` per split and class (``None``: all), and a
    check that no patient is in two splits. ``test/`` is left exactly as published.
    """
    index = load_kermany(data_dir)
    index = grouped_split(index, val_fraction, seed, keep_official_val=keep_official_val)
    index = subsample(index, max_images_per_class, seed)
    assert_no_patient_leak(index)
    return index


def split_files(
    index: pd.DataFrame, splits: Sequence[str] = SPLITS
) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """File paths and labels per split: ``({split: paths}, {split: labels (n,) int})``."""
    pairs = {split: paths_and_labels(index, split) for split in splits}
    return {s: p for s, (p, _) in pairs.items()}, {s: y for s, (_, y) in pairs.items()}


class TooFewPositivesError(ValueError):
    """Too few positive images or patients for a meaningful patient-level split."""


def patient_split(
    index: pd.DataFrame,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    seed: int = 0,
    min_positive_patients: int = 10,
    min_per_split: int = 2,
) -> pd.DataFrame:
    """A patient-level, stratified train/validation/test split of the whole index.

    For data sets without an official split (NIH ChestX-ray14). Patients, not images, are
    assigned: about ``test_fraction`` of them to ``test``, ``val_fraction`` to ``val`` and the
    rest to ``train``, stratified by whether a patient has any positive image (scikit-learn's
    seeded stratified shuffle split over the patient table, so it takes well under a second
    even for the 30,000 patients of the full NIH table). All of a patient's images land in
    one split; this is asserted.

    Raises :class:`TooFewPositivesError`, saying how many there are and what to do, when
    fewer than ``min_positive_patients`` patients have a positive image or when a split
    would get fewer than ``min_per_split`` images of either class: metrics on one or two
    positive test images say nothing, and a threshold chosen on them would be noise.

    Returns a copy of the index with a new ``split`` column.
    """
    from sklearn.model_selection import train_test_split

    if not (0.0 < test_fraction < 1.0 and 0.0 < val_fraction < 1.0 and test_fraction + val_fraction < 1.0):
        raise ValueError(
            "test_fraction and val_fraction must be between 0 and 1 and sum to less than 1, "
            f"got {test_fraction} and {val_fraction}"
        )
    advice = (
        "Choose a more common positive finding (for NIH ChestX-ray14 e.g. finding='Effusion' "
        "or 'Infiltration') or add images"
    )
    has_positive = index.groupby("patient")["label"].max()
    n_positive = int((index["label"] == 1).sum())
    counts = has_positive.value_counts()
    positive_patients, negative_patients = int(counts.get(1, 0)), int(counts.get(0, 0))
    if positive_patients < min_positive_patients or negative_patients < 2:
        raise TooFewPositivesError(
            f"only {n_positive} positive image(s) from {positive_patients} patient(s), and "
            f"{negative_patients} patient(s) with negative images only ({len(index)} images in "
            f"all): a patient-level train/validation/test split needs at least "
            f"{min_positive_patients} positive patients and {min_per_split} images of each class "
            f"in every split. {advice}."
        )
    patients = has_positive.index.to_numpy()
    strata = has_positive.to_numpy()
    rest, test = train_test_split(patients, test_size=test_fraction, stratify=strata, random_state=seed)
    rest_strata = has_positive.loc[rest].to_numpy()
    train, val = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=rest_strata, random_state=seed
    )
    assignment = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}
    out = index.copy()
    out["split"] = out["patient"].map(assignment)
    per_split = out.groupby(["split", "label"]).size().unstack("label", fill_value=0)
    per_split = per_split.reindex(index=["train", "val", "test"], columns=[0, 1], fill_value=0)
    short = per_split[(per_split < min_per_split).any(axis=1)]
    if len(short):
        described = "; ".join(
            f"{split}: {row[1]} positive, {row[0]} negative" for split, row in short.iterrows()
        )
        raise TooFewPositivesError(
            f"the patient-level split leaves too few images of a class ({described}; at least "
            f"{min_per_split} of each are needed in every split). There are {n_positive} positive "
            f"image(s) from {positive_patients} patient(s). {advice}, or change "
            "test_fraction/val_fraction."
        )
    assert_no_patient_leak(out)
    return out
