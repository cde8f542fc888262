"""Download the public chest X-ray data sets from Kaggle and lay them out for the notebooks.

Usage::

    python -m pneumo_utils.fetch kermany --dest data/     # -> data/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}
    python -m pneumo_utils.fetch nih --dest data/nih      # -> data/nih/{Data_Entry_2017.csv,images_001,...}

The files are downloaded with ``kagglehub`` (into its cache, ``~/.cache/kagglehub`` unless
``KAGGLEHUB_CACHE`` says otherwise), falling back to the ``kaggle`` API package when kagglehub
is not installed. They are then *symlinked* into ``--dest`` (``--copy`` copies instead), so the
notebooks always find the same layout whatever the cache location.

Without a network, without Kaggle credentials or when Kaggle refuses, the command prints one
message saying what went wrong and what to do, and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXIT_FETCH_FAILED = 2


@dataclass(frozen=True)
class DatasetSpec:
    """A Kaggle data set and how to recognise and place its root folder."""

    key: str
    handle: str
    url: str
    is_root: Callable[[Path], bool]
    description: str


def is_kermany_root(path: Path) -> bool:
    """True when ``path`` holds ``train``, ``val`` and ``test``, each with NORMAL and PNEUMONIA."""
    return all(
        (path / split / cls).is_dir()
        for split in ("train", "val", "test")
        for cls in ("NORMAL", "PNEUMONIA")
    )


def is_nih_root(path: Path) -> bool:
    """True when ``path`` holds the NIH ChestX-ray14 label file ``Data_Entry_2017.csv``."""
    return (path / "Data_Entry_2017.csv").is_file()


DATASETS: dict[str, DatasetSpec] = {
    "kermany": DatasetSpec(
        key="kermany",
        handle="paultimothymooney/chest-xray-pneumonia",
        url="https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia",
        is_root=is_kermany_root,
        description="Kermany et al. pediatric chest X-rays (NORMAL / PNEUMONIA), ~1.2 GB",
    ),
    "nih": DatasetSpec(
        key="nih",
        handle="nih-chest-xrays/data",
        url="https://www.kaggle.com/datasets/nih-chest-xrays/data",
        is_root=is_nih_root,
        description="NIH ChestX-ray14 (112,120 frontal X-rays, 14 findings), ~45 GB",
    ),
}


class FetchError(RuntimeError):
    """A download that failed for a reason the user can fix (network, credentials, layout)."""


def find_dataset_root(base: Path, is_root: Callable[[Path], bool] = is_kermany_root) -> Path:
    """Return the shallowest folder under ``base`` (``base`` included) for which ``is_root`` holds.

    Kaggle archives nest folders (``chest_xray/chest_xray/train/...``) and carry macOS
    ``__MACOSX`` resource-fork copies; hidden folders and ``__MACOSX`` are skipped.
    Raises ``FileNotFoundError`` when no folder qualifies.
    """
    base = Path(base)
    level = [base]
    while level:
        for folder in level:
            if is_root(folder):
                return folder
        level = sorted(
            child
            for folder in level
            for child in folder.iterdir()
            if child.is_dir() and child.name != "__MACOSX" and not child.name.startswith(".")
        )
    raise FileNotFoundError(f"no data set root found under {base}")


def _kagglehub_download(handle: str) -> Path:
    """Download ``handle`` with kagglehub (cached) and return the local folder."""
    import kagglehub

    return Path(kagglehub.dataset_download(handle))


def _kaggle_api_download(handle: str) -> Path:
    """Fallback: download and unzip ``handle`` with the ``kaggle`` API package."""
    from kaggle.api.kaggle_api_extended import KaggleApi  # importing may raise on no credentials

    target = Path(os.environ.get("PNEUMO_KAGGLE_CACHE", Path.home() / ".cache" / "pneumo-kaggle"))
    target = target / handle.replace("/", "__")
    api = KaggleApi()
    api.authenticate()
    api.dataset_download_files(handle, path=str(target), unzip=True, quiet=False)
    return target


def download(handle: str) -> Path:
    """Download a Kaggle data set, preferring kagglehub, and return where its files are."""
    if importlib.util.find_spec("kagglehub") is not None:
        return _kagglehub_download(handle)
    if importlib.util.find_spec("kaggle") is not None:
        return _kaggle_api_download(handle)
    raise FetchError(
        "neither 'kagglehub' nor 'kaggle' is installed (pip install 'pneumo[fetch]' "
        "or pip install kagglehub)"
    )


def _explain(exc: BaseException) -> str:
    """Turn a download exception into a short description of what went wrong."""
    name = type(exc).__name__
    first = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{name}: {first[:160]}{'...' if len(first) > 160 else ''}".strip().rstrip(":")
    lowered = f"{name} {exc}".lower()
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403) or any(
        word in lowered for word in ("credential", "unauthenticated", "unauthorized", "kaggle.json")
    ):
        return f"Kaggle credentials are missing or were refused ({text})"
    if status == 404 or "notfound" in lowered.replace(" ", ""):
        return f"Kaggle did not find the data set ({text})"
    if any(
        word in lowered
        for word in (
            "connection",
            "resolve",
            "name or service",
            "timed out",
            "timeout",
            "network",
            "unreachable",
            "max retries",
        )
    ):
        return f"no network connection to Kaggle ({text})"
    return f"the download failed ({text})"


def _help_message(spec: DatasetSpec, dest: Path, reason: str) -> str:
    """The single message printed when a download cannot be done."""
    layout = (
        f"{dest}/chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}}"
        if spec.key == "kermany"
        else f"{dest}/Data_Entry_2017.csv (plus the images_*/ folders)"
    )
    return (
        f"error: could not download '{spec.handle}': {reason}.\n"
        "To fix it, either:\n"
        "  1. connect to the internet and give Kaggle credentials: set KAGGLE_USERNAME and\n"
        "     KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ (Kaggle > Settings > API > Create\n"
        "     New Token), then run this command again; or\n"
        f"  2. download the archive by hand from {spec.url}\n"
        f"     and unzip it into {dest} so that {layout} exists."
    )


def place_dataset(root: Path, dest: Path, spec: DatasetSpec, copy: bool = False) -> Path:
    """Make the data set found at ``root`` available under ``dest``; return the final folder.

    Kermany: ``dest/chest_xray`` becomes a symlink to (or copy of) ``root``.
    NIH: every entry of ``root`` is symlinked (or copied) into ``dest``.
    Existing entries are left alone.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(root).resolve()
    pairs = (
        [(root, dest / "chest_xray")]
        if spec.key == "kermany"
        else [(child, dest / child.name) for child in sorted(root.iterdir())]
    )
    for source, target in pairs:
        if target.exists() or target.is_symlink():
            continue
        if copy and source.is_dir():
            shutil.copytree(source, target)
        elif copy:
            shutil.copy2(source, target)
        else:
            target.symlink_to(source, target_is_directory=source.is_dir())
    return dest / "chest_xray" if spec.key == "kermany" else dest


def existing_root(spec: DatasetSpec, dest: Path) -> Path | None:
    """Return the data set root if it is already in place under ``dest``, else None."""
    candidate = Path(dest) / "chest_xray" if spec.key == "kermany" else Path(dest)
    return candidate if candidate.is_dir() and spec.is_root(candidate) else None


def fetch(key: str, dest: Path, copy: bool = False, force: bool = False) -> Path:
    """Download data set ``key`` (``kermany`` or ``nih``) and place it under ``dest``.

    Raises ``FetchError`` with a user-facing message when the download or layout fails.
    """
    spec = DATASETS[key]
    dest = Path(dest)
    if spec.key == "kermany" and dest.name == "chest_xray":
        dest = dest.parent  # accept --dest data/chest_xray as meaning data/
    if not force and (found := existing_root(spec, dest)) is not None:
        print(f"{spec.key}: already in place at {found}")
        return found
    print(f"{spec.key}: downloading {spec.handle} ({spec.description}) ...", flush=True)
    try:
        downloaded = download(spec.handle)
    except FetchError as exc:
        raise FetchError(_help_message(spec, dest, str(exc))) from exc
    except Exception as exc:  # network, credentials, HTTP errors: all user-fixable here
        raise FetchError(_help_message(spec, dest, _explain(exc))) from exc
    try:
        root = find_dataset_root(downloaded, spec.is_root)
    except FileNotFoundError as exc:
        raise FetchError(
            f"error: downloaded {spec.handle} to {downloaded}, but found no folder with the "
            "expected layout in it; delete it and try again, or unzip the archive by hand into "
            f"{dest}."
        ) from exc
    final = place_dataset(root, dest, spec, copy=copy)
    how = "copied" if copy else "linked"
    print(f"{spec.key}: data set at {final} ({how} from {root})")
    return final


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pneumo_utils.fetch``."""
    parser = argparse.ArgumentParser(
        prog="python -m pneumo_utils.fetch",
        description="Download a chest X-ray data set from Kaggle and lay it out for the notebooks.",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which data set")
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="target folder (default: data/ for kermany, data/nih for nih)",
    )
    parser.add_argument("--copy", action="store_true", help="copy the files instead of symlinking")
    parser.add_argument(
        "--force", action="store_true", help="download even if the data set is already in place"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success and 2 when the data set could not be fetched."""
    args = build_parser().parse_args(argv)
    dest = args.dest or Path("data" if args.dataset == "kermany" else "data/nih")
    try:
        fetch(args.dataset, dest, copy=args.copy, force=args.force)
    except FetchError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FETCH_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
