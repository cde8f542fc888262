"""NIH ChestX-ray14 (or a simple ``path,label`` CSV) as the index: normal vs one finding.

The labels come from a table (``Data_Entry_2017*.csv``), which is checked row by row (blank
patients, conflicting or repeated rows, paths outside their folder) before any image is looked
for. The table is the index of :mod:`pneumo_utils.data.datasets` with ``split`` left
``"unassigned"`` (:func:`pneumo_utils.data.splits.patient_split` assigns it), plus ``image``
and ``findings``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils import CLASS_NAMES
from pneumo_utils.data.datasets import (
    DatasetLayoutError,
    report_skipped,
    require_columns,
    unreadable_files,
)

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
            "`pneumo fetch nih --dest data/nih`."
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


def _labels_table(data_dir_or_csv: str | Path, labels_csv: str | Path | None
                  ) -> tuple[Path, Path, pd.DataFrame, str]:
    """``(csv, base, table, kind)``: the label table found from the arguments of
    :func:`load_nih`, the folder its image paths are relative to, the table and its kind."""
    if labels_csv is not None:
        csv, base = find_labels_csv(labels_csv), Path(data_dir_or_csv).expanduser()
    else:
        csv = find_labels_csv(data_dir_or_csv)
        base = csv.parent
    table, kind = read_labels_table(csv)
    return csv, base, table, kind


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
    csv, base, table, kind = _labels_table(data_dir_or_csv, labels_csv)
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
        bad = unreadable_files(table["path"].tolist()) if check_images else []
        table = table[~table["path"].isin({str(p) for p, _ in bad})]
        summary["dropped: unreadable image"] = len(bad)
        report_skipped([], bad, on_bad_image)
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
    csv, base, table, kind = _labels_table(data_dir_or_csv, labels_csv)
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
