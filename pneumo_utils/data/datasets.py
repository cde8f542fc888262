"""One loader per data set, each returning the same *index* table.

The index is the one truth about a data set downstream: a pandas DataFrame with one row per
image and the columns ``path`` (str), ``label`` (0 NORMAL, 1 PNEUMONIA), ``patient`` (str),
``split`` (``train``/``val``/``test``) and ``source`` (data set name). Splits, pipelines,
feature caches and reports read only this table, so a new data set needs only a new loader.
Kermany-layout folders add ``subtype`` (``normal``, ``bacteria``, ``virus``; missing for a
PNEUMONIA file whose name carries neither), which :mod:`pneumo_utils.data.tasks` turns into the
labels of the bacterial-vs-viral and three-class tasks.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.images import check_images as _check_files
from pneumo_utils.data.images import is_image_file

SPLITS: tuple[str, str, str] = ("train", "val", "test")
INDEX_COLUMNS: list[str] = ["path", "label", "patient", "split", "source"]
KERMANY_COLUMNS: list[str] = [*INDEX_COLUMNS, "subtype"]

_KERMANY_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


_SUBTYPE_PATTERN = re.compile(r"^person\d+_(bacteria|virus)_\d+", re.IGNORECASE)


class DatasetLayoutError(ValueError):
    """A data set folder or table does not have the layout a loader expects."""


class BadImagesWarning(UserWarning):
    """Some image files could not be read and were left out of the index."""


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
            "`python -m pneumo_utils.fetch kermany --dest data/`."
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
    are cached by file size and modification time, see
    :func:`pneumo_utils.data.images.check_images`).
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
            problems = list(zip(images, _check_files(images), strict=True))
            bad.extend((p, msg) for p, msg in problems if msg)
            images = [p for p, msg in problems if not msg]
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
    _report_skipped(skipped, bad, on_bad_image)
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


# --------------------------------------------------------------------------- NIH ChestX-ray14

NIH_COLUMNS: tuple[str, str, str] = ("Image Index", "Finding Labels", "Patient ID")
"""Columns of the NIH label table (``Data_Entry_2017*.csv``) the loader needs."""

SIMPLE_COLUMNS: tuple[str, str] = ("path", "label")
"""Columns of a simple labels CSV (one image per row); a patient column is optional."""

NO_FINDING = "No Finding"
UNASSIGNED = "unassigned"
"""``split`` of every row :func:`load_nih` returns; :func:`pneumo_utils.data.splits.patient_split`
assigns train/val/test."""

_PATIENT_COLUMNS = ("patient", "patient_id", "Patient ID", "patientid")
_SIMPLE_LABELS = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1}


class MissingImagesWarning(UserWarning):
    """Rows of a labels table whose image file is not on disk; they were left out."""


class MissingImagesError(DatasetLayoutError):
    """Rows of a labels table whose image file is not on disk (``on_missing="error"``)."""


def map_finding_labels(finding_labels: pd.Series, finding: str = "Pneumonia") -> pd.Series:
    """NIH ``Finding Labels`` strings -> 1 (positive), 0 (``No Finding``) or -1 (dropped).

    A row is positive when ``finding`` is one of its ``|``-separated labels, compared as a
    whole label and case-insensitively (``Effusion|PNEUMONIA`` is positive for ``Pneumonia``;
    a hypothetical ``Pneumonia_like`` is not). A row is negative (NORMAL) only when its
    label list is exactly ``No Finding``. Every other row (other findings only) is -1.
    """
    target = str(finding).strip().casefold()
    if not target or target == NO_FINDING.casefold():
        raise ValueError(f"finding must name a positive finding such as 'Pneumonia', got {finding!r}")
    text = finding_labels.fillna("").astype(str).str.casefold()
    text = text.str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    positive = ("|" + text + "|").str.contains(f"|{target}|", regex=False)
    normal = text == NO_FINDING.casefold()
    out = pd.Series(-1, index=finding_labels.index, dtype=np.int64)
    out[normal] = 0
    out[positive] = 1
    return out


def find_labels_csv(data_dir_or_csv: str | Path) -> Path:
    """The labels table for :func:`load_nih`: the path itself, or the CSV inside a folder.

    In a folder, ``Data_Entry_2017*.csv`` / ``.csv.gz`` (the NIH table) is preferred;
    otherwise the folder must hold exactly one ``*.csv`` / ``*.csv.gz``.
    """
    path = Path(data_dir_or_csv).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"NIH data {path} does not exist. Point data_dir at a folder holding images/ and "
            "Data_Entry_2017.csv (or .csv.gz), or at a labels CSV; download the data set with "
            "`python -m pneumo_utils.fetch nih --dest data/nih`."
        )
    if path.is_file():
        return path
    nih = sorted(path.glob("Data_Entry_2017*.csv")) + sorted(path.glob("Data_Entry_2017*.csv.gz"))
    if nih:
        return nih[0]
    tables = sorted(path.glob("*.csv")) + sorted(path.glob("*.csv.gz"))
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise DatasetLayoutError(
            f"no labels CSV in {path}; expected Data_Entry_2017.csv(.gz) (columns "
            f"{list(NIH_COLUMNS)}) or a CSV with columns {list(SIMPLE_COLUMNS)}."
        )
    raise DatasetLayoutError(
        f"several CSV files in {path} ({', '.join(t.name for t in tables)}) and none is "
        "Data_Entry_2017*.csv; name the one to use (labels_csv=...)."
    )


def read_labels_table(csv: str | Path) -> tuple[pd.DataFrame, str]:
    """Read a labels CSV and tell its format: ``"nih"`` or ``"simple"``.

    The NIH format is recognised by any of the columns ``Image Index``, ``Finding Labels``
    or ``Patient ID``, and then needs all three; otherwise the table needs ``path`` and
    ``label``. A missing column raises :class:`DatasetLayoutError` listing the expected and
    the found columns.
    """
    csv = Path(csv)
    expected = f"expected columns {list(SIMPLE_COLUMNS)} or, for the NIH table, {list(NIH_COLUMNS)}"
    try:
        table = pd.read_csv(csv, dtype={"Patient ID": str})
    except pd.errors.EmptyDataError:
        raise DatasetLayoutError(f"labels CSV {csv} is empty (no header, no rows); {expected}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        text = " ".join(str(exc).split())
        raise DatasetLayoutError(f"cannot read labels CSV {csv}: {text}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise DatasetLayoutError(
            f"labels CSV {csv} has a header ({', '.join(table.columns)}) but no rows"
        )
    if any(c in table.columns for c in NIH_COLUMNS):
        require_columns(table, NIH_COLUMNS, f"NIH labels table {csv}")
        return table, "nih"
    try:
        require_columns(table, SIMPLE_COLUMNS, f"labels CSV {csv}")
    except DatasetLayoutError as exc:
        raise DatasetLayoutError(
            f"{exc} (or, for the NIH table, expected {list(NIH_COLUMNS)})"
        ) from None
    return table, "simple"


def nih_image_folders(root: str | Path) -> list[Path]:
    """Folders that may hold NIH PNGs: ``root/images``, the Kaggle ``root/images_0NN/images``
    folders, or ``root`` itself when it has none of them."""
    root = Path(root)
    candidates = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    folders = [p for p in candidates if p.is_dir()]
    return folders or [root]


def _files_by_name(folders: Sequence[Path]) -> dict[str, str]:
    """File name -> path for the files directly inside ``folders`` (first folder wins)."""
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and not entry.name.startswith("."):
                    found.setdefault(entry.name, entry.path)
    return found


def _simple_labels(values: pd.Series, csv: Path) -> pd.Series:
    """0/1 from a simple CSV's ``label`` column (0/1 or NORMAL/PNEUMONIA, any case)."""
    keys = values.astype(str).str.strip().str.casefold().str.replace(r"\.0$", "", regex=True)
    labels = keys.map(_SIMPLE_LABELS)
    unknown = sorted(set(values[labels.isna()].astype(str)))
    if unknown:
        raise DatasetLayoutError(
            f"labels CSV {csv}: unknown label value(s) {unknown[:10]}; expected 0/1 or "
            f"{'/'.join(CLASS_NAMES)}."
        )
    return labels.astype(np.int64)


def load_nih(
    data_dir_or_csv: str | Path,
    images_dir: str | Path | None = None,
    finding: str = "Pneumonia",
    balance: bool = True,
    seed: int = 0,
    check_images: bool = True,
    on_missing: str = "warn",
    require_images: bool = True,
    labels_csv: str | Path | None = None,
    on_bad_image: str = "warn",
    allow_outside_paths: bool = False,
) -> pd.DataFrame:
    """Index NIH ChestX-ray14 (or a simple ``path,label`` CSV) for normal vs ``finding``.

    Parameters
    ----------
    data_dir_or_csv : a folder holding the label CSV and the images (``images/``, or the
        Kaggle download's ``images_0NN/images/``), or the CSV itself.
    images_dir : where the image files are; default: found next to the CSV (see
        :func:`nih_image_folders`). Paths in a simple CSV are relative to it (default: the
        CSV's folder).
    finding : the positive finding (NIH table only). ``No Finding`` rows become NORMAL (0),
        rows whose ``|``-separated labels contain ``finding`` (whole label, any case) become
        PNEUMONIA (1, i.e. "finding present"); every other row is dropped.
    balance : downsample the normals (seeded, ``seed``) to the number of positives.
    check_images : decode-check every image found, so corrupt files are reported now.
    on_missing : ``"warn"`` leaves rows whose image is not on disk out with one warning
        (:class:`MissingImagesWarning`) giving the count and a few names; ``"error"`` raises
        :class:`MissingImagesError` instead. Nothing is dropped silently.
    require_images : ``False`` is the pure-table mode: no file system look-ups at all, every
        labelled row is kept and ``path`` is where the image would be (for label statistics
        and splits on the full 112,120-row table without its 45 GB of images).
    labels_csv : the table, when it is not (the only CSV) inside ``data_dir_or_csv``; the
        images are then looked for under ``data_dir_or_csv``.
    on_bad_image : what to do with unreadable images, as in :func:`load_kermany`.
    allow_outside_paths : a simple CSV's paths must stay inside the folder they are relative
        to (no ``..``, absolute or ``~`` paths), so that a labels file cannot make the loader
        read files elsewhere; ``True`` lifts that.

    The table is checked first: a row without a patient id, or an image listed twice with
    different labels or patients, raises :class:`DatasetLayoutError` naming the CSV lines;
    rows repeated identically are kept once, with a warning. When no labelled image is on
    disk at all, the error names the table and the folders searched.

    Returns
    -------
    The index (``path, label, patient, split, source``) with ``split`` = ``"unassigned"``
    and ``source`` = ``"nih"`` (or ``"csv"``), plus ``image`` (file name) and ``findings``
    (the original label text). Patient ids come from ``Patient ID`` (zero-padded to the
    8 digits of the file names) or a simple CSV's patient column; without one every image is
    its own patient, with a warning. ``index.attrs["load_summary"]`` counts every step (see
    :func:`load_steps`).
    """
    for name, value in (("on_missing", on_missing), ("on_bad_image", on_bad_image)):
        if value not in ("warn", "error"):
            raise ValueError(f"{name} must be 'warn' or 'error', got {value!r}")
    if labels_csv is not None:
        csv, base = find_labels_csv(labels_csv), Path(data_dir_or_csv).expanduser()
    else:
        csv = find_labels_csv(data_dir_or_csv)
        base = csv.parent
    table, kind = read_labels_table(csv)
    summary: dict = {"table": str(csv), "format": kind, "rows in table": len(table)}
    table = _check_rows(table, kind, csv)
    summary["dropped: duplicate rows"] = summary["rows in table"] - len(table)
    if kind == "simple" and not allow_outside_paths:
        root = Path(images_dir).expanduser() if images_dir is not None else csv.parent
        _refuse_outside_paths(table["path"].astype(str).str.strip(), root, csv)

    if kind == "nih":
        labels = map_finding_labels(table["Finding Labels"], finding)
        if not (labels == 1).any():
            known = sorted({s.strip() for v in table["Finding Labels"].dropna() for s in str(v).split("|")})
            raise ValueError(
                f"no row of {csv} carries the finding {finding!r}; findings in this table: {known}"
            )
        names = table["Image Index"].astype(str).str.strip()
        patients = table["Patient ID"].astype(str).str.strip()
        patients = patients.where(~patients.str.fullmatch(r"\d+"), patients.str.zfill(8))
        findings = table["Finding Labels"].astype(str)
        summary.update(finding=finding, patients_from="the Patient ID column")
    else:
        labels = _simple_labels(table["label"], csv)
        names = table["path"].astype(str).str.strip()
        findings = labels.map(dict(enumerate(CLASS_NAMES)))
        patient_column = next((c for c in _PATIENT_COLUMNS if c in table.columns), None)
        if patient_column is None:
            patients = names.map(lambda p: Path(p).stem)
            warnings.warn(
                f"labels CSV {csv} has no patient column ({'/'.join(_PATIENT_COLUMNS[:2])}): "
                "each image is treated as its own patient, so a patient-level split cannot "
                "keep one patient's images together.",
                UserWarning,
                stacklevel=2,
            )
            summary["patients_from"] = "none (each image its own patient)"
        else:
            patients = table[patient_column].astype(str).str.strip()
            summary["patients_from"] = f"the {patient_column} column"
        finding = CLASS_NAMES[1]
        summary["finding"] = finding
    summary[f"positive ({finding})"] = int((labels == 1).sum())
    summary[f"{NO_FINDING} (NORMAL)"] = int((labels == 0).sum())
    summary["dropped: other findings only"] = int((labels == -1).sum())

    keep = (labels >= 0).to_numpy()
    table = pd.DataFrame({
        "image": names[keep].str.replace("\\", "/").str.rsplit("/", n=1).str[-1].to_numpy(),
        "name": names[keep].to_numpy(),
        "label": labels[keep].to_numpy(),
        "patient": patients[keep].to_numpy(),
        "findings": findings[keep].to_numpy(),
    })
    source = "nih" if kind == "nih" else "csv"
    table["path"], found, searched = _locate_images(
        table["name"], kind, csv, base, images_dir, require_images
    )
    if require_images:
        missing = table.loc[~found, "name"].tolist()
        summary["dropped: image not on disk"] = len(missing)
        if missing and len(missing) == len(table):
            raise MissingImagesError(
                f"none of the {len(table):,} labelled images in {csv} is on disk (looked in "
                f"{', '.join(map(str, searched))}; e.g. {missing[0]}); point images_dir at the "
                "folder holding them, and check that the file names match the table exactly "
                "(case included)."
            )
        _report_missing(missing, len(table), csv, on_missing)
        table = table[found]
        bad: list[tuple[Path, str]] = []
        if check_images:
            problems = _check_files(table["path"].tolist())
            bad = [(Path(p), msg) for p, msg in zip(table["path"], problems, strict=True) if msg]
            table = table[[msg is None for msg in problems]]
        summary["dropped: unreadable image"] = len(bad)
        _report_skipped([], bad, on_bad_image)
        if table.empty:
            raise DatasetLayoutError(f"no labelled image listed in {csv} could be read (see the "
                                     "warning above for each file)")
    if balance:
        positives, normals = table[table["label"] == 1], table[table["label"] == 0]
        if len(normals) > len(positives):
            normals = normals.sample(n=len(positives), random_state=seed)
        summary["dropped: normals removed by balancing"] = int((table["label"] == 0).sum() - len(normals))
        table = pd.concat([positives, normals]).sort_index()
    index = pd.DataFrame({
        "path": table["path"].astype(str),
        "label": table["label"].astype(np.int64),
        "patient": table["patient"].astype(str),
        "split": UNASSIGNED,
        "source": source,
        "image": table["image"],
        "findings": table["findings"],
    }).reset_index(drop=True)
    summary["in the index"] = len(index)
    summary["patients in the index"] = int(index["patient"].nunique())
    index.attrs["load_summary"] = summary
    return index


def _locate_images(
    names: pd.Series,
    kind: str,
    csv: Path,
    base: Path,
    images_dir,
    require_images: bool,
) -> tuple[pd.Series, np.ndarray, list[Path]]:
    """Each row's image path, whether it exists (all True in pure-table mode), and the
    folders searched."""
    if kind == "nih":
        folders = [Path(images_dir).expanduser()] if images_dir is not None else nih_image_folders(base)
        if images_dir is not None:
            folders += sorted(p for p in folders[0].glob("images_*/images") if p.is_dir())
        if not require_images:
            return str(folders[0]) + os.sep + names, np.ones(len(names), bool), folders
        on_disk = _files_by_name([f for f in folders if f.is_dir()])
        paths = names.map(lambda n: on_disk.get(n, str(folders[0] / n)))
        return paths, names.map(lambda n: n in on_disk).to_numpy(bool), folders
    root = Path(images_dir).expanduser() if images_dir is not None else csv.parent

    def resolve(name: str) -> str:
        path = Path(name).expanduser()
        if path.is_absolute():
            return str(path)
        candidate = root / path
        if require_images and images_dir is None and not candidate.is_file():
            alternative = root / "images" / path
            if alternative.is_file():
                return str(alternative)
        return str(candidate)

    paths = names.map(resolve)
    if not require_images:
        return paths, np.ones(len(names), bool), [root]
    return paths, paths.map(lambda p: Path(p).is_file()).to_numpy(bool), [root]


def _refuse_outside_paths(names: pd.Series, root: Path, csv: Path) -> None:
    """Raise naming the CSV lines whose path is absolute, starts with ``~`` or climbs out of
    ``root`` with ``..`` (checked on the text, so nothing outside is even looked at)."""
    outside = [
        (line, name)
        for line, name in zip(names.index + 2, names, strict=True)
        if name.startswith("~")
        or Path(name).is_absolute()
        or os.path.normpath(name.replace("\\", "/")).split(os.sep)[0] == ".."
    ]
    if outside:
        shown = ", ".join(f"line {line}: {name}" for line, name in outside[:5])
        raise DatasetLayoutError(
            f"labels CSV {csv}: {len(outside)} path(s) point outside {root} ({shown}"
            f"{', ...' if len(outside) > 5 else ''}); paths must be relative to that folder "
            "(pass allow_outside_paths=True to read files elsewhere)."
        )


def _check_rows(table: pd.DataFrame, kind: str, csv: Path) -> pd.DataFrame:
    """Refuse rows without a patient id and images listed twice with different labels or
    patients (naming the CSV lines); drop identical repeats with a warning."""
    image_col, label_col = ("Image Index", "Finding Labels") if kind == "nih" else ("path", "label")
    patient_col = "Patient ID" if kind == "nih" else next(
        (c for c in _PATIENT_COLUMNS if c in table.columns), None
    )
    lines = table.index + 2  # line 1 is the header
    if patient_col is not None:
        blank = table[patient_col].isna() | (table[patient_col].astype(str).str.strip() == "")
        if blank.any():
            shown = ", ".join(map(str, lines[blank][:10]))
            raise DatasetLayoutError(
                f"labels CSV {csv}: {int(blank.sum())} row(s) have no {patient_col} (line(s) "
                f"{shown}{', ...' if blank.sum() > 10 else ''}); every image needs its patient "
                "for a patient-level split: fill them in or remove those rows."
            )
    key = table[image_col].astype(str).str.strip()
    if kind == "nih":
        labels = table[label_col].astype(str).str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    else:
        labels = _simple_labels(table[label_col], csv).map(dict(enumerate(CLASS_NAMES)))
    content = labels.str.casefold()
    if patient_col is not None:
        content = content + "\0" + table[patient_col].astype(str).str.strip()
    repeated = key.duplicated(keep=False)
    if not repeated.any():
        return table
    conflicting = content[repeated].groupby(key[repeated]).nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        first = conflicting.index[0]
        rows = key == first
        shown = "; ".join(f"line {line}: {label!r}" for line, label in zip(lines[rows], labels[rows], strict=True))
        raise DatasetLayoutError(
            f"labels CSV {csv}: {len(conflicting)} image(s) are listed with different labels or "
            f"patients, e.g. {first} ({shown}); keep one row per image."
        )
    dropped = key.duplicated(keep="first")
    shown = ", ".join(map(str, lines[dropped][:10]))
    warnings.warn(
        f"labels CSV {csv}: {int(dropped.sum())} duplicate row(s) repeat an earlier row (line(s) "
        f"{shown}{', ...' if dropped.sum() > 10 else ''}); each image is kept once.",
        UserWarning,
        stacklevel=3,
    )
    return table[~dropped]


def _report_missing(missing: list[str], n_rows: int, csv: Path, on_missing: str) -> None:
    """One warning (or an error) counting the labelled rows whose image is not on disk."""
    if not missing:
        return
    examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    message = (
        f"{len(missing):,} of {n_rows:,} labelled image(s) in {csv.name} are not on disk "
        f"({examples})"
    )
    if on_missing == "error":
        raise MissingImagesError(message + "; pass on_missing='warn' to leave them out.")
    warnings.warn(message + "; they are left out of the index.", MissingImagesWarning, stacklevel=3)


def load_steps(index: pd.DataFrame) -> pd.DataFrame:
    """What :func:`load_nih` did, step by step (rows kept and dropped), as a table."""
    summary = index.attrs.get("load_summary", {})
    rows = {k: v for k, v in summary.items() if isinstance(v, (int, np.integer))}
    return pd.DataFrame({"rows": pd.Series(rows, dtype="int64")}).rename_axis("step")


def finding_counts(
    data_dir_or_csv: str | Path,
    images_dir: str | Path | None = None,
    on_disk_only: bool = False,
    labels_csv: str | Path | None = None,
) -> pd.DataFrame:
    """Images and patients per NIH finding label (a row counts for each of its labels).

    With ``on_disk_only`` only rows whose image file is found are counted (as located by
    :func:`load_nih`). For choosing a positive finding: a patient-level three-way split
    needs a few dozen positive patients. Sorted by images, most common first.
    """
    if labels_csv is not None:
        csv, base = find_labels_csv(labels_csv), Path(data_dir_or_csv).expanduser()
    else:
        csv = find_labels_csv(data_dir_or_csv)
        base = csv.parent
    table, kind = read_labels_table(csv)
    if kind != "nih":
        raise DatasetLayoutError(f"{csv} is not an NIH table (columns {list(NIH_COLUMNS)})")
    if on_disk_only:
        folders = [Path(images_dir)] if images_dir is not None else nih_image_folders(base)
        on_disk = _files_by_name([f for f in folders if f.is_dir()])
        table = table[table["Image Index"].astype(str).str.strip().isin(on_disk)]
    long = table.assign(
        finding=table["Finding Labels"].fillna("").astype(str).str.split("|")
    ).explode("finding")
    long["finding"] = long["finding"].str.strip()
    long = long[long["finding"] != ""]
    counts = long.groupby("finding").agg(images=("Image Index", "size"), patients=("Patient ID", "nunique"))
    return counts.sort_values(["images", "patients"], ascending=False)


def label_rule_counts(
    data_dir_or_csv: str | Path,
    findings: Sequence[str] = ("Pneumonia",),
    labels_csv: str | Path | None = None,
) -> pd.DataFrame:
    """The label rule of :func:`load_nih` applied to the whole NIH table, images or not.

    One row per positive finding: images (table rows) and patients that become positive,
    ``No Finding`` rows and patients (NORMAL), and rows dropped (other findings only).
    For the full table this needs only the CSV, not the 45 GB of images.
    """
    csv = find_labels_csv(labels_csv if labels_csv is not None else data_dir_or_csv)
    table, kind = read_labels_table(csv)
    if kind != "nih":
        raise DatasetLayoutError(f"{csv} is not an NIH table (columns {list(NIH_COLUMNS)})")
    rows = {}
    for finding in {f.strip().casefold(): f.strip() for f in findings}.values():
        labels = map_finding_labels(table["Finding Labels"], finding)
        patients = table["Patient ID"]
        rows[finding] = {
            "positive images": int((labels == 1).sum()),
            "positive patients": int(patients[labels == 1].nunique()),
            "No Finding images": int((labels == 0).sum()),
            "No Finding patients": int(patients[labels == 0].nunique()),
            "dropped rows (other findings only)": int((labels == -1).sum()),
            "rows in table": len(table),
        }
    return pd.DataFrame(rows).T.rename_axis("positive finding")
