"""The index: the one table every data set loader returns, and what reads it.

The index is the one truth about a data set downstream: a pandas DataFrame with one row per
image and the columns ``path`` (str), ``label`` (0 NORMAL, 1 PNEUMONIA), ``patient`` (str),
``split`` (``train``/``val``/``test``) and ``source`` (data set name). Splits, pipelines,
feature caches and reports read only this table. Each data set has its own loader module
(:mod:`pneumo_utils.data.kermany`, :mod:`pneumo_utils.data.nih`) returning it, so a data set
is swapped by changing one call; a new data set needs only a new loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.image_checks import check_images

SPLITS: tuple[str, str, str] = ("train", "val", "test")
INDEX_COLUMNS: list[str] = ["path", "label", "patient", "split", "source"]


class DatasetLayoutError(ValueError):
    """A data set folder or table does not have the layout a loader expects."""


class BadImagesWarning(UserWarning):
    """Some image files could not be read and were left out of the index."""


def unreadable_files(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` of each file that fails the decode check
    (:func:`pneumo_utils.data.image_checks.check_images`: cached by content, in threads)."""
    return [(Path(p), reason) for p, reason in zip(paths, check_images(paths), strict=True) if reason]


def report_skipped(skipped: list[Path], bad: list[tuple[Path, str]], on_bad_image: str) -> None:
    """One warning for non-image files and one for unreadable images (or an error), warned
    at the caller of the loader that calls this."""
    if skipped:
        names = sorted({p.name for p in skipped})
        warnings.warn(
            f"skipped {len(skipped)} non-image file(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''})",
            UserWarning,
            stacklevel=3,
        )
    if bad:
        listing = "\n".join(f"  {p}: {msg}" for p, msg in bad)
        if on_bad_image == "error":
            raise DatasetLayoutError(f"{len(bad)} unreadable image(s):\n{listing}")
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) (pass on_bad_image='error' to stop "
            f"instead):\n{listing}",
            BadImagesWarning,
            stacklevel=3,
        )


def summarize(index: pd.DataFrame, class_names: Sequence[str] = CLASS_NAMES) -> pd.DataFrame:
    """Image and patient counts per split and class (``class_names`` in label order), for the
    notebooks' tables."""
    table = index.assign(cls=index["label"].map(dict(enumerate(class_names))))
    counts = table.groupby(["split", "cls"]).agg(
        images=("path", "size"), patients=("patient", "nunique")
    )
    return counts.unstack("cls").fillna(0).astype(int)


def paths_and_labels(index: pd.DataFrame, split: str) -> tuple[list[str], np.ndarray]:
    """File paths and labels of one split, in index order."""
    part = index[index["split"] == split]
    if part.empty:
        raise DatasetLayoutError(f"the index has no rows in split {split!r}")
    return part["path"].tolist(), part["label"].to_numpy(dtype=np.int64)


def patients_of(index: pd.DataFrame, split: str) -> np.ndarray:
    """Patient ids of one split, in the order of :func:`paths_and_labels` (for patient-level
    bootstrap CIs)."""
    return index.loc[index["split"] == split, "patient"].to_numpy()


def require_columns(table: pd.DataFrame, expected: Iterable[str], what: str) -> None:
    """Raise naming the missing columns, the expected ones and those found."""
    expected = list(expected)
    missing = [c for c in expected if c not in table.columns]
    if missing:
        raise DatasetLayoutError(
            f"{what} is missing column(s) {missing}; expected {expected}, "
            f"found {list(table.columns)}."
        )
