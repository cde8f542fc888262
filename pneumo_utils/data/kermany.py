"""The Kermany et al. (2018) chest X-ray data set, and any folder in its layout, as the index.

``{train,val,test}/{NORMAL,PNEUMONIA}/*``: labels from the class folders, patients from the
file names, and ``subtype`` (``normal``, ``bacteria``, ``virus``; missing for a PNEUMONIA file
whose name carries neither), which :mod:`pneumo_utils.data.tasks` turns into the labels of the
bacterial-vs-viral and three-class tasks. The table is the index of
:mod:`pneumo_utils.data.datasets` plus ``subtype``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.datasets import (
    INDEX_COLUMNS,
    SPLITS,
    DatasetLayoutError,
    report_skipped,
    unreadable_files,
)
from pneumo_utils.data.images import is_image_file

KERMANY_COLUMNS: list[str] = [*INDEX_COLUMNS, "subtype"]

_KERMANY_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


_SUBTYPE_PATTERN = re.compile(r"^person\d+_(bacteria|virus)_\d+", re.IGNORECASE)


class NestedImagesWarning(UserWarning):
    """Images in sub-folders of a class folder were indexed with that folder's class."""


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


def kermany_subtype(filename: str, label: int) -> str | None:
    """Subtype of a Kermany image from its class (``label``) and file name.

    NORMAL images (label 0) are ``"normal"``; a PNEUMONIA image is ``"bacteria"`` or
    ``"virus"`` when its name says so (``person1946_bacteria_4874.jpeg``,
    ``person1_virus_6.jpeg``), else ``None``: the image can still serve the pneumonia task,
    and :func:`pneumo_utils.data.tasks.task_index` names it when a task needs its subtype.
    """
    if int(label) == 0:
        return "normal"
    match = _SUBTYPE_PATTERN.match(Path(filename).name)
    return match.group(1).lower() if match else None


def find_kermany_root(path: str | Path, splits: Sequence[str] = SPLITS) -> Path:
    """The folder holding the split folders (``train/``, ``val/``, ``test/``) at or below
    ``path``; only the first of ``splits`` is looked for, so a root holding just ``test/``
    is found when ``splits=("test",)``.

    Accepts the data root itself, or a download folder that nests it (Kaggle's archive
    unpacks to ``chest_xray/chest_xray/...`` next to a ``__MACOSX`` folder).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data root {path} does not exist. Point data_dir at a folder laid out as "
            "{train,val,test}/{NORMAL,PNEUMONIA}, or download the data set with "
            "`pneumo fetch kermany --dest data/`."
        )
    first = splits[0] if splits else SPLITS[0]
    candidates = [path] + sorted(p for p in path.rglob(first) if "__MACOSX" not in p.parts)
    for candidate in candidates:
        root = candidate if candidate == path else candidate.parent
        if (root / first).is_dir():
            return root
    raise DatasetLayoutError(
        f"no {first}/ folder found in {path}; expected {path}/{{{','.join(splits)}}}/"
        f"{{{','.join(CLASS_NAMES)}}}."
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
    ``index.attrs`` lists what was left out or deserves a look: ``"skipped"`` (one
    ``{"path", "reason"}`` per unreadable image or non-image file) and ``"nested"``
    (class sub-folder -> number of images indexed from it), see :func:`load_class_folder`.

    Raises
    ------
    DatasetLayoutError naming the folder when a split or class folder is missing, empty, or
    an unknown class folder is present.
    """
    root = find_kermany_root(data_dir, splits)
    tables = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetLayoutError(
                f"missing split folder {split_dir}; expected {root}/{{{','.join(splits)}}}/"
                f"{{{','.join(CLASS_NAMES)}}}."
            )
        tables.append(load_class_folder(split_dir, split, "kermany", check_images, on_bad_image))
    index = pd.concat(tables, ignore_index=True)
    index.attrs = {
        "skipped": [item for t in tables for item in t.attrs["skipped"]],
        "nested": {k: v for t in tables for k, v in t.attrs["nested"].items()},
    }
    return index


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
    that counts them. Images in sub-folders of a class folder are indexed with that class,
    with a :class:`NestedImagesWarning` naming the sub-folders. ``index.attrs["skipped"]``
    and ``index.attrs["nested"]`` record both (see :func:`load_kermany` for the other
    parameters and errors). With ``check_images`` every image is decoded once (verdicts
    are cached by content, see
    :func:`pneumo_utils.data.image_checks.check_images`).
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
    nested: dict[str, int] = {}
    for label, class_name in enumerate(CLASS_NAMES):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            raise DatasetLayoutError(f"missing class folder {class_dir}.")
        images, non_images = _class_files(class_dir)
        skipped.extend(non_images)
        if check_images:
            unreadable = unreadable_files(images)
            bad.extend(unreadable)
            refused = {p for p, _ in unreadable}
            images = [p for p in images if p not in refused]
        for p in images:
            if p.parent != class_dir:
                sub = str(p.parent.relative_to(folder))
                nested[sub] = nested.get(sub, 0) + 1
        if not images:
            raise DatasetLayoutError(
                f"class folder {class_dir} has no readable images "
                "(expected .jpeg/.jpg/.png/.dcm files)."
            )
        rows += [(str(p), label, kermany_patient_id(p.name), split, source, kermany_subtype(p.name, label))
                 for p in images]
    report_skipped(skipped, bad, on_bad_image)
    if nested:
        listing = ", ".join(f"{sub} ({n})" for sub, n in sorted(nested.items()))
        warnings.warn(
            f"{sum(nested.values())} image(s) in sub-folders of class folders of {folder} are "
            f"labelled by the class folder above them: {listing}; move them out if that is "
            "not their class.",
            NestedImagesWarning,
            stacklevel=2,
        )
    index = pd.DataFrame(rows, columns=KERMANY_COLUMNS)
    index.attrs = {
        "skipped": [{"path": str(p), "reason": "not an image file"} for p in skipped]
        + [{"path": str(p), "reason": msg} for p, msg in bad],
        "nested": nested,
    }
    return index
