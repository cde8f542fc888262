"""Find the chest X-ray data sets on disk, or download the public ones with kagglehub.

Usage::

    pneumo fetch kermany [--dest data]  # -> data/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}
    pneumo fetch nih-sample             # -> data/nih_sample/{sample_labels.csv,images/}
    pneumo fetch nih                    # -> data/nih (the full 45 GB ChestX-ray14 set)

Downloads go to kagglehub's cache (``~/.cache/kagglehub`` unless ``KAGGLEHUB_CACHE`` says
otherwise, with a progress bar) and are *symlinked* into the data folder (``--copy`` copies), so
the notebooks find the same layout wherever the cache is. The three sets are public: no Kaggle
credentials are needed. A failed download prints one message saying what went wrong and the two
ways to fix it, and exits with status 2.

:func:`locate` is how ``run_all.sh`` finds a data set before any notebook starts: an explicit
folder, else ``data/<name>``, else the read-only copy in ``../shared/data/<name>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_FETCH_FAILED = 2
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
KERMANY_SPLITS = ("train", "val", "test")
KERMANY_CLASSES = ("NORMAL", "PNEUMONIA")


LAYOUT_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
"""What the data set loaders index as an image (``images.IMAGE_EXTENSIONS``), named here so
that finding data imports no image library."""


class FetchError(RuntimeError):
    """A data set that is missing or could not be downloaded; the message says how to fix it."""


class LayoutError(FetchError):
    """A data set folder that is in place but that its loader would refuse (one line)."""


def is_kermany_root(path: Path) -> bool:
    """True when ``path`` holds ``train``, ``val`` and ``test``, each with NORMAL and PNEUMONIA."""
    return all((path / s / c).is_dir() for s in KERMANY_SPLITS for c in KERMANY_CLASSES)


def nih_labels(path: Path) -> Path | None:
    """The NIH label table in ``path`` (``Data_Entry_2017*.csv[.gz]`` or ``sample_labels.csv``)."""
    patterns = ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz", "sample_labels.csv")
    found = [p for pattern in patterns for p in sorted(Path(path).glob(pattern))]
    return found[0] if found else None


def is_nih_root(path: Path) -> bool:
    """True when ``path`` holds an NIH label table."""
    return Path(path).is_dir() and nih_labels(path) is not None


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: where it is looked for, its Kaggle handle, and how to recognise its root."""

    key: str
    title: str
    handle: str
    folder: str
    is_root: Callable[[Path], bool]
    layout: str
    size: str

    @property
    def url(self) -> str:
        """The data set's Kaggle page."""
        return f"https://www.kaggle.com/datasets/{self.handle}"


DATASETS: dict[str, DatasetSpec] = {
    "kermany": DatasetSpec(
        key="kermany",
        title="Kermany paediatric chest X-rays (NORMAL / PNEUMONIA)",
        handle="paultimothymooney/chest-xray-pneumonia",
        folder="chest_xray",
        is_root=is_kermany_root,
        layout="{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg",
        size="1.2 GB",
    ),
    "nih": DatasetSpec(
        key="nih",
        title="NIH ChestX-ray14 (112,120 images)",
        handle="nih-chest-xrays/data",
        folder="nih",
        is_root=is_nih_root,
        layout="Data_Entry_2017.csv plus images_*/images/*.png",
        size="45 GB",
    ),
    "nih-sample": DatasetSpec(
        key="nih-sample",
        title="NIH ChestX-ray14 sample (5,606 images, same label table)",
        handle="nih-chest-xrays/sample",
        folder="nih_sample",
        is_root=is_nih_root,
        layout="sample_labels.csv plus images/*.png",
        size="4 GB",
    ),
}

def is_class_folder(path: Path) -> bool:
    """True when ``path`` holds NORMAL and PNEUMONIA folders (a labelled evaluation set)."""
    return all((Path(path) / c).is_dir() for c in KERMANY_CLASSES)


EXTERNAL: dict[str, DatasetSpec] = {
    "external": DatasetSpec(
        key="external",
        title="labelled external validation set (Kermany layout, another site or collection)",
        handle="",
        folder="chest_xray_external",
        is_root=is_class_folder,
        layout="{NORMAL,PNEUMONIA}/*.jpeg",
        size="",
    ),
    "official-test-a": DatasetSpec(
        key="official-test-a",
        title="half A of Kermany's official test split, as labelled external validation",
        handle="",
        folder="chest_xray_official_test_a",
        is_root=is_class_folder,
        layout="{NORMAL,PNEUMONIA}/*.jpeg",
        size="",
    ),
}
"""External validation sets: looked for, never downloaded (there is no public copy of a
site's own labelled sample); a run without one says so and goes on."""

SEARCH_ORDER = {"kermany": ("kermany",), "nih": ("nih", "nih-sample"),
                "external": ("external", "official-test-a")}
"""Which data sets satisfy a need, in order of preference; the last one is downloaded."""


SEARCH_ROOTS = (Path("data"), Path("..") / "shared" / "data")
"""Where data sets are looked for, relative to the project folder, after an explicit option:
the project's own ``data/``, then a read-only ``shared/data/`` beside the project (a class, a lab
or a build machine may provide one); then the public sets are downloaded (README, docs/data.md)."""
WEIGHTS_ROOTS = (Path("weights"), Path("..") / "shared" / "weights")
"""Where ImageNet weight files are looked for when neither ``--weights-dir`` nor
``PNEUMO_WEIGHTS_DIR`` names a folder; else Keras downloads them."""


def weights_dir(base: Path = Path()) -> Path | None:
    """The first folder of :data:`WEIGHTS_ROOTS` under ``base`` that exists, or ``None``."""
    return next((base / root for root in WEIGHTS_ROOTS if (base / root).is_dir()), None)


def candidates(need: str, base: Path = Path()) -> list[Path]:
    """The folders :func:`locate` looks in for ``need`` (``"kermany"`` or ``"nih"``), in order."""
    specs = [{**DATASETS, **EXTERNAL}[key] for key in SEARCH_ORDER[need]]
    return [base / root / s.folder for root in SEARCH_ROOTS for s in specs]


def locate(need: str, explicit: str | Path | None = None, base: Path = Path()) -> Path | None:
    """The folder holding data set ``need``: ``explicit`` if given, else the first candidate.

    An ``explicit`` folder without the expected layout raises :class:`FetchError`; ``None``
    means nothing was found (the caller may :func:`fetch` it).
    """
    spec = {**DATASETS, **EXTERNAL}[SEARCH_ORDER[need][0]]
    if explicit:
        path = Path(explicit).expanduser()
        if not spec.is_root(path):
            raise FetchError(
                f"{path} is not a {spec.title} folder: expected {path}/{spec.layout}."
            )
    else:
        path = next((p for p in candidates(need, base) if spec.is_root(p)), None)
    problem = layout_problem(path, need) if path is not None else None
    if problem:
        raise LayoutError(f"{problem} (the {need} data set, {spec.layout}); fix the folder or "
                          f"give another one")
    return path


def has_image(folder: Path, suffixes: Sequence[str] = LAYOUT_SUFFIXES, nested: bool = True) -> bool:
    """True when ``folder`` (and, if ``nested``, its sub-folders) holds a file named like an
    image, hidden files aside; it stops at the first one."""
    files = Path(folder).rglob("*") if nested else Path(folder).iterdir()
    return any(p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file() for p in files)


def layout_problem(root: Path, need: str) -> str | None:
    """Why the loader of ``need`` (``"kermany"`` or ``"nih"``) would refuse ``root`` although
    its folders are in place, or None: a class folder besides NORMAL and PNEUMONIA, a class
    folder without images, an NIH table without images.

    Notebooks meet these faults only inside their kernels, one after another; counting file
    names (nothing is decoded, the first image found is enough) takes milliseconds, so the
    runner and :func:`fetch` check before anything starts.
    """
    root = Path(root)
    if need == "kermany":
        for split in KERMANY_SPLITS:
            extra = sorted(p.name for p in (root / split).iterdir()
                           if p.is_dir() and p.name not in KERMANY_CLASSES and not p.name.startswith((".", "__")))
            if extra:
                return (f"{root / split} holds class folder(s) {', '.join(extra)} besides "
                        f"{' and '.join(KERMANY_CLASSES)}; move them out of the data set")
        empty = [f"{s}/{c}" for s in KERMANY_SPLITS for c in KERMANY_CLASSES if not has_image(root / s / c)]
        if len(empty) == len(KERMANY_SPLITS) * len(KERMANY_CLASSES):
            return f"{root} holds no images in any of {{{','.join(KERMANY_SPLITS)}}}/{{{','.join(KERMANY_CLASSES)}}}"
        if empty:
            return f"{root} holds no images in {', '.join(empty)}; every split needs both classes"
    elif need == "nih":
        candidates = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
        folders = [p for p in candidates if p.is_dir()] or [root]
        if not any(has_image(f, (".png",), nested=False) for f in folders):
            return (f"{root} holds its label table but no images (*.png) in "
                    f"{', '.join(str(f) for f in folders)}")
    return None


def find_dataset_root(base: Path, is_root: Callable[[Path], bool] = is_kermany_root) -> Path:
    """The shallowest folder under ``base`` (``base`` included) for which ``is_root`` holds.

    Kaggle archives nest folders (``chest_xray/chest_xray/train/...``) and carry macOS
    ``__MACOSX`` copies; hidden folders and ``__MACOSX`` are skipped. Raises
    ``FileNotFoundError`` when no folder qualifies.
    """
    level = [Path(base)]
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


def count_images(root: Path, key: str) -> dict[str, int]:
    """Images per ``split/CLASS`` (Kermany) or in ``images`` folders (NIH), for the layout check."""
    if key == "kermany":
        return {
            f"{s}/{c}": sum(p.suffix.lower() in IMAGE_SUFFIXES for p in (root / s / c).iterdir())
            for s in KERMANY_SPLITS
            for c in KERMANY_CLASSES
        }
    folders = [p for p in root.glob("**/images") if p.is_dir()] or [root]
    return {"images": sum(1 for f in folders for p in f.iterdir() if p.suffix.lower() == ".png")}


def download(handle: str) -> Path:
    """Download a public Kaggle data set with kagglehub (cached, with progress); its folder."""
    import kagglehub

    return Path(kagglehub.dataset_download(handle))


def _explain(exc: BaseException) -> str:
    """A short description of why a download failed."""
    first = (str(exc).splitlines() or [""])[0][:160]
    text = f"{type(exc).__name__}: {first}".rstrip(": ")
    lowered = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, ImportError):
        return f"kagglehub is not installed: pip install kagglehub ({text})"
    if any(w in lowered for w in ("connection", "resolve", "timed out", "timeout", "unreachable")):
        return f"no network connection to Kaggle ({text})"
    if "404" in lowered or "not found" in lowered:
        return f"Kaggle did not find the data set ({text})"
    return f"the download failed ({text})"


def how_to_fix(needs: dict[str, str]) -> str:
    """The two ways to provide missing data sets (``needs``: need -> who needs it)."""
    options = {
        "kermany": ("--data-root DIR (env PNEUMO_DATA_ROOT)", "kermany"),
        "nih": ("--nih-root DIR (env PNEUMO_NIH_ROOT)", "nih-sample"),
    }
    fetches = "; ".join(f"pneumo fetch {options[n][1]}" for n in needs)
    folders = "\n".join(
        f"     {options[n][0]}: a folder with {DATASETS[SEARCH_ORDER[n][0]].layout}" for n in needs
    )
    return (
        "To fix it, either:\n"
        "  1. connect to the internet and run the command again: the public sets are downloaded\n"
        f"     with kagglehub, no account needed (or download now: {fetches}); or\n"
        f"  2. point at folders you already have:\n{folders}"
    )


def place_dataset(root: Path, dest: Path, copy: bool = False) -> Path:
    """Make the data set found at ``root`` appear as ``dest`` (symlinks, or copies).

    Kermany: ``dest`` links to ``root``. NIH: ``dest`` is a folder with a link to each entry of
    ``root``, plus ``dest/images`` linking to the image folder when ``root`` has none at its top.
    Existing entries are left alone.
    """
    import shutil

    root = Path(root).resolve()
    if is_kermany_root(root):
        pairs = [(root, dest)]
    else:
        dest.mkdir(parents=True, exist_ok=True)
        pairs = [(child, dest / child.name) for child in sorted(root.iterdir())]
        nested = sorted(p for p in root.glob("*/**/images") if p.is_dir())
        if not (root / "images").is_dir() and not list(root.glob("images_*")) and nested:
            pairs.append((nested[0], dest / "images"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    for source, target in pairs:
        if target.exists() or target.is_symlink():
            continue
        if copy and source.is_dir():
            shutil.copytree(source, target)
        elif copy:
            shutil.copy2(source, target)
        else:
            target.symlink_to(source, target_is_directory=source.is_dir())
    return dest


def fetch(key: str, dest: Path | str = "data", copy: bool = False) -> Path:
    """Download data set ``key`` into ``dest/<its folder>`` (``dest`` itself if so named).

    Checks the layout and counts the images; raises :class:`FetchError` with a message saying
    what to do when the download or the check fails.
    """
    spec = DATASETS[key]
    dest = Path(dest)
    dest = dest if dest.name == spec.folder else dest / spec.folder
    need = "kermany" if key == "kermany" else "nih"
    if spec.is_root(dest):
        problem = layout_problem(dest, need)
        if problem:
            raise LayoutError(f"error: {problem}; delete {dest} and run this again to download it afresh")
        print(f"{key}: already in place at {dest}")
        return dest
    print(f"{key}: downloading {spec.handle} ({spec.title}, about {spec.size}) ...", flush=True)
    try:
        downloaded = download(spec.handle)
    except Exception as exc:  # network, HTTP, missing package: all fixed the same two ways
        raise FetchError(
            f"error: could not download {spec.handle}: {_explain(exc)}.\n{how_to_fix({need: key})}"
        ) from exc
    try:
        root = find_dataset_root(downloaded, spec.is_root)
    except FileNotFoundError as exc:
        raise FetchError(
            f"error: downloaded {spec.handle} to {downloaded}, but no folder in it has the "
            f"layout {spec.layout}; delete that folder and try again."
        ) from exc
    final = place_dataset(root, dest, copy=copy)
    counts = count_images(final, key)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise FetchError(f"error: {final} has no images in {', '.join(empty)}; delete it and retry.")
    print(f"{key}: {final} ({'copied' if copy else 'linked'} from {root}): "
          + ", ".join(f"{name} {n:,}" for name, n in counts.items()), flush=True)
    return final


def find_all(
    needs: dict[str, list[str]], roots: dict[str, str | None], offline: bool = False
) -> dict[str, Path]:
    """The folder of each needed data set (``{"kermany": [notebook names], ...}``).

    Looks with :func:`locate` (``roots`` holds explicit folders), downloads what is missing
    unless ``offline``, and reports everything still missing in one :class:`FetchError`.
    """
    found: dict[str, Path] = {}
    problems: list[str] = []
    for need, users in needs.items():
        try:
            path = locate(need, roots.get(need))
            if path is None and not offline:
                path = fetch(SEARCH_ORDER[need][-1])
        except LayoutError:
            raise
        except FetchError as exc:
            problems.append(str(exc).removeprefix("error: ").split("\nTo fix it")[0])
            continue
        if path is None:
            looked = ", ".join(str(p) for p in candidates(need))
            problems.append(
                f"the {DATASETS[need].title} data is missing (needed by {', '.join(users)}; "
                f"looked in {looked}; downloads are off: --offline or PNEUMO_OFFLINE=1)"
            )
        else:
            found[need] = path
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise FetchError(f"no data to run on:\n{listed}\n{how_to_fix(needs)}")
    return found


def _is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a pneumo checkout: ``notebooks/`` beside a ``pyproject.toml`` that
    names the project."""
    project = folder / "pyproject.toml"
    if not ((folder / "notebooks").is_dir() and project.is_file()):
        return False
    try:
        return 'name = "pneumo"' in project.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False


def project_root() -> Path:
    """The folder a notebook's relative paths mean: the pneumo checkout the kernel runs in
    (the current folder or the nearest folder above it with ``notebooks/`` and pneumo's
    ``pyproject.toml``, as ``pyprojroot`` and R's ``here`` find a project), else the checkout
    that holds this package, else the current folder (a pip-installed package, e.g. in Colab).
    A kernel started in ``notebooks/`` by JupyterLab and ``run_all.sh`` started at the root
    thus read and write the same folders, and a second checkout that uses the first one's
    environment writes into its own folders, not the first's."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if _is_checkout(folder):
            return folder
    package_checkout = Path(__file__).resolve().parents[2]
    return package_checkout if _is_checkout(package_checkout) else here


def weights_folders() -> list[Path]:
    """Where ImageNet weight files are looked for, in order: ``PNEUMO_WEIGHTS_DIR`` when set,
    then :data:`WEIGHTS_ROOTS` under :func:`project_root` (``weights/``, ``../shared/weights/``),
    then Keras' cache (``~/.keras/models``); after them Keras downloads the file. The runner
    and the notebooks share this one list (docs/data.md)."""
    import os

    folders = [Path(os.environ["PNEUMO_WEIGHTS_DIR"]).expanduser()] if os.environ.get("PNEUMO_WEIGHTS_DIR") else []
    folders += [project_root() / root for root in WEIGHTS_ROOTS]
    return [*folders, Path.home() / ".keras" / "models"]


def in_project(path: str | Path) -> Path:
    """``path`` as given when absolute, else under :func:`project_root`."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def find(need: str, explicit: str | Path | None = None, required: bool = True,
         offline: bool | None = None) -> Path | None:
    """The folder of data set ``need`` for a notebook, wherever its kernel started.

    ``explicit`` (relative to :func:`project_root`) wins; else the search of :func:`locate`
    from the project root (``data/``, then ``../shared/data/``); else, when ``required``,
    the public copy is downloaded (unless ``offline``, default: the ``PNEUMO_OFFLINE``
    environment variable) and a :class:`FetchError` says what to do when that is not
    possible. A set that is not ``required`` (the external validation set) is ``None`` when
    absent.
    """
    import os

    path = locate(need, in_project(explicit) if explicit else None, base=project_root())
    if path is not None or not required:
        return path
    if offline if offline is not None else os.environ.get("PNEUMO_OFFLINE") == "1":
        looked = ", ".join(str(p) for p in candidates(need, project_root()))
        raise FetchError(f"the {need} data is missing (looked in {looked}); {how_to_fix({need: []})}")
    return fetch(SEARCH_ORDER[need][-1], dest=project_root() / "data")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success and 2 when the data set could not be fetched."""
    parser = argparse.ArgumentParser(
        prog="pneumo fetch",
        description="Download a public chest X-ray data set with kagglehub into data/.",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which data set")
    parser.add_argument(
        "--dest", type=Path, default=Path("data"), help="parent folder (default: %(default)s)"
    )
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking")
    args = parser.parse_args(argv)
    try:
        fetch(args.dataset, args.dest, copy=args.copy)
    except FetchError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FETCH_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
