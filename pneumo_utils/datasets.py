"""One loader per data set, each returning the same *index* table.

The index is the one truth about a data set downstream: a pandas DataFrame with one row per
image and the columns ``path`` (str), ``label`` (0 NORMAL, 1 PNEUMONIA), ``patient`` (str),
``split`` (``train``/``val``/``test``) and ``source`` (data set name). Splits, pipelines,
feature caches and reports read only this table, so a new data set needs only a new loader.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.images import check_image, is_image_file

SPLITS: tuple[str, str, str] = ("train", "val", "test")
INDEX_COLUMNS: list[str] = ["path", "label", "patient", "split", "source"]

_KERMANY_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


class DatasetLayoutError(ValueError):
    """A data set folder or table does not have the layout a loader expects."""


class BadImagesWarning(UserWarning):
    """Some image files could not be read and were left out of the index."""


def kermany_patient_id(filename: str) -> str:
    """Patient id encoded in a Kermany file name.

    ``person1946_bacteria_4874.jpeg`` -> ``person1946``; ``IM-0117-0001.jpeg`` -> ``IM-0117``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427`` (the ``IM`` and ``NORMAL2-IM`` number
    ranges are different patients, so the prefix is kept). Unknown names fall back to the file
    stem, i.e. every such image is treated as its own patient.
    """
    name = Path(filename).name
    for pattern in _KERMANY_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def find_kermany_root(path: str | Path) -> Path:
    """The folder holding ``train/``, ``val/`` and ``test/`` at or below ``path``.

    Accepts the data root itself, or a download folder that nests it (Kaggle's archive
    unpacks to ``chest_xray/chest_xray/...`` next to a ``__MACOSX`` folder).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data root {path} does not exist. Point data_dir at a folder laid out as "
            "{train,val,test}/{NORMAL,PNEUMONIA}, or download the data set with "
            "`python -m pneumo_utils.fetch kermany --dest data/`."
        )
    candidates = [path] + sorted(p for p in path.rglob("train") if "__MACOSX" not in p.parts)
    for candidate in candidates:
        root = candidate if candidate == path else candidate.parent
        if (root / "train").is_dir():
            return root
    raise DatasetLayoutError(
        f"no train/ folder found in {path}; expected {path}/{{train,val,test}}/{{NORMAL,PNEUMONIA}}."
    )


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files and skipped non-image files in one class folder (sorted, recursive)."""
    images, skipped = [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        (images if is_image_file(file) else skipped).append(file)
    return images, skipped


def load_kermany(
    data_dir: str | Path,
    splits: Sequence[str] = SPLITS,
    check_images: bool = True,
    on_bad_image: str = "warn",
) -> pd.DataFrame:
    """Index a Kermany-layout data set: ``{train,val,test}/{NORMAL,PNEUMONIA}/*``.

    Parameters
    ----------
    data_dir : the data root (or a folder that nests it, see :func:`find_kermany_root`).
    splits : which split folders must exist and are indexed.
    check_images : decode-check every file so corrupt or truncated images are found now,
        not in the middle of an epoch.
    on_bad_image : ``"warn"`` skips unreadable images with one warning listing them;
        ``"error"`` raises instead.

    Returns
    -------
    The index DataFrame (see module docstring); ``source`` is ``"kermany"``.

    Raises
    ------
    DatasetLayoutError naming the folder when a split or class folder is missing, empty, or
    an unknown class folder is present.
    """
    root = find_kermany_root(data_dir)
    tables = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetLayoutError(
                f"missing split folder {split_dir}; expected {root}/{{{','.join(splits)}}}/"
                f"{{{','.join(CLASS_NAMES)}}}."
            )
        tables.append(load_class_folder(split_dir, split, "kermany", check_images, on_bad_image))
    return pd.concat(tables, ignore_index=True)


def load_class_folder(
    folder: str | Path,
    split: str = "test",
    source: str = "folder",
    check_images: bool = True,
    on_bad_image: str = "warn",
) -> pd.DataFrame:
    """Index one folder holding ``NORMAL/`` and ``PNEUMONIA/`` sub-folders as ``split``.

    Used for each Kermany split and for evaluating a model on any folder in that layout.
    Non-image files (``.DS_Store``, ``Thumbs.db``, ``.txt``) are skipped with one warning
    that counts them; see :func:`load_kermany` for the other parameters and errors.
    """
    if on_bad_image not in ("warn", "error"):
        raise ValueError(f"on_bad_image must be 'warn' or 'error', got {on_bad_image!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"folder {folder} does not exist; expected {folder}/{{{','.join(CLASS_NAMES)}}}/."
        )
    unknown = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir() and p.name not in CLASS_NAMES and not p.name.startswith((".", "__"))
    )
    if unknown:
        raise DatasetLayoutError(
            f"unknown class folder(s) {unknown} in {folder}; expected only {list(CLASS_NAMES)}."
        )
    rows, skipped, bad = [], [], []
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            raise DatasetLayoutError(f"missing class folder {class_dir}.")
        images, non_images = _class_files(class_dir)
        skipped.extend(non_images)
        if check_images:
            problems = [(p, check_image(p)) for p in images]
            bad.extend((p, msg) for p, msg in problems if msg)
            images = [p for p, msg in problems if not msg]
        if not images:
            raise DatasetLayoutError(
                f"class folder {class_dir} has no readable images "
                "(expected .jpeg/.jpg/.png/.dcm files)."
            )
        rows += [(str(p), label, kermany_patient_id(p.name), split, source) for p in images]
    _report_skipped(skipped, bad, on_bad_image)
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def _report_skipped(skipped: list[Path], bad: list[tuple[Path, str]], on_bad_image: str) -> None:
    """One warning for non-image files and one for unreadable images (or an error)."""
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


def summarize(index: pd.DataFrame) -> pd.DataFrame:
    """Image and patient counts per split and class, for the notebooks' tables."""
    table = index.assign(cls=index["label"].map(dict(enumerate(CLASS_NAMES))))
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


def require_columns(table: pd.DataFrame, expected: Iterable[str], what: str) -> None:
    """Raise naming the missing columns, the expected ones and those found."""
    expected = list(expected)
    missing = [c for c in expected if c not in table.columns]
    if missing:
        raise DatasetLayoutError(
            f"{what} is missing column(s) {missing}; expected {expected}, "
            f"found {list(table.columns)}."
        )
