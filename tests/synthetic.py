"""Small synthetic chest-X-ray-like data sets in the Kermany folder layout, for tests.

The real data set (Kermany et al. 2018) is 1.2 GB and needs a download; tests and CI need
something that builds in well under a second, has the same folder structure and file
names (so patient-id parsing and grouped splits are exercised) and holds a learnable,
localised signal (so training, AUC and Grad-CAM checks are meaningful):

* every image has a dark background, a soft-tissue "thorax", two elliptical lung fields
  with a darker interior, a bright spine band, noise, brightness/contrast jitter and a
  small random shift;
* PNEUMONIA images also get a soft bright opacity (a Gaussian blob) placed at a random
  spot inside :data:`SIGNAL_BOX` (the lower part of the lung on the image's left). The
  blob adds about 4 grey levels to the image mean while the brightness jitter is +-15,
  so a mean-brightness classifier is poor (AUC ~0.63) while the scratch CNN of
  :mod:`pneumo_utils.model.backbones` reaches AUC > 0.95 and puts its Grad-CAM heat on the box
  (checked over several seeds with tests/test_learning.py's recipe: 40 images per
  class, 25 epochs). The blob constants below were tuned for that; a smaller or fainter
  blob made the GAP-headed CNN fail on some seeds.
* with ``subtype="virus"`` (``make_kermany_like(..., subtype_signal=True)`` for the
  ``person<N>_virus_<k>`` files) the opacity is *viral*: two fainter, wider blobs, one in
  each lung (the planted one and its mirror image across the spine), a diffuse bilateral
  pattern where a bacterial one is a single dense focus. Both come from the same random
  draws, so the subtype changes only the pattern.

Command line: ``python tests/synthetic.py DEST [--per-class N] [--image-size S]
[--seed S] [--subtypes]`` writes ``DEST/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (with
``--subtypes``, viral files carry the viral pattern);
``python tests/synthetic.py DEST --kind nih [--patients N] [--image-size S] [--seed S]``
writes an NIH ChestX-ray14-style set, ``DEST/images/*.png`` plus ``DEST/Data_Entry_2017.csv``
(see :func:`make_nih_like`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo_utils import CLASS_NAMES

__all__ = ["NIH_TABLE_COLUMNS", "SIGNAL_BOX", "SPLITS", "make_kermany_like", "make_nih_like", "synthetic_xray"]

SIGNAL_BOX: tuple[float, float, float, float] = (0.5, 0.15, 0.85, 0.45)
"""``(y0, x0, y1, x1)`` as fractions of the image height/width: where the PNEUMONIA
opacity is planted: the blob centre stays 2 sigma inside the box, so at the box edge
the opacity has faded to at most 14% of its peak and further out to nothing."""

SPLITS: tuple[str, str, str] = ("train", "val", "test")

_BLOB_SIGMA = (0.075, 0.065)  # (y, x) as fractions of the image size
_BLOB_AMPLITUDE = (125.0, 155.0)  # grey levels added at the blob centre, before contrast
_BLOB_MARGIN = 2.0  # blob centre stays this many sigmas inside SIGNAL_BOX
_VIRAL_SPREAD = 1.6  # a viral blob's sigma relative to the bacterial one
_VIRAL_AMPLITUDE = 0.6  # a viral blob's peak relative to the bacterial one
SUBTYPES: tuple[str, str] = ("bacteria", "virus")
_MAX_SHIFT_PX = 3
_BRIGHTNESS_JITTER = 15.0  # grey levels, uniform +-
_CONTRAST_JITTER = 0.15  # relative, uniform +-
_NOISE_SD = 6.0


def _soft_ellipse(yy, xx, cy, cx, ry, rx, edge=0.08):
    """1 inside the ellipse, 0 outside, with a smooth edge; also returns the normalised
    radius (0 at the centre, 1 on the rim)."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge)), r


def synthetic_xray(
    label: int, rng: np.random.Generator, image_size: int = 64, subtype: str = "bacteria"
) -> np.ndarray:
    """One synthetic frontal chest X-ray, ``(image_size, image_size, 3)`` uint8 gray-in-RGB.

    ``label`` 0 is NORMAL, 1 is PNEUMONIA: with ``subtype="bacteria"`` a bright opacity
    inside :data:`SIGNAL_BOX`, with ``"virus"`` two fainter, wider ones, in the box and in
    its mirror image across the spine (``subtype`` is ignored for NORMAL). All randomness
    comes from ``rng``, and the number of draws depends on neither the label nor the
    subtype, so the same generator state gives the same anatomy for every class.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (NORMAL) or 1 (PNEUMONIA), got {label!r}")
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    n = int(image_size)
    if n < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size!r}")
    # draws first, in a fixed order
    shift_y, shift_x = rng.integers(-_MAX_SHIFT_PX, _MAX_SHIFT_PX + 1, size=2) / n
    offset = rng.uniform(-_BRIGHTNESS_JITTER, _BRIGHTNESS_JITTER)
    contrast = rng.uniform(1.0 - _CONTRAST_JITTER, 1.0 + _CONTRAST_JITTER)
    lung_shade = rng.uniform(55.0, 75.0)
    y0, x0, y1, x1 = SIGNAL_BOX
    sy, sx = _BLOB_SIGMA
    m = _BLOB_MARGIN
    blob_cy = rng.uniform(y0 + m * sy, y1 - m * sy)
    blob_cx = rng.uniform(x0 + m * sx, x1 - m * sx)
    blob_amp = rng.uniform(*_BLOB_AMPLITUDE)
    noise = rng.normal(0.0, _NOISE_SD, size=(n, n)).astype(np.float32)

    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    ay, ax = yy - shift_y, xx - shift_x  # anatomy coordinates (shifted); the blob is not

    img = np.full((n, n), 15.0, np.float32)  # background
    thorax, _ = _soft_ellipse(ay, ax, 0.55, 0.5, 0.5, 0.44)
    img += 105.0 * thorax
    for cx in (0.31, 0.69):  # lung fields: dark interior brightening towards the rim
        lung, r = _soft_ellipse(ay, ax, 0.5, cx, 0.32, 0.14, edge=0.06)
        img += lung * (lung_shade + 45.0 * np.clip(r, 0, 1) ** 2 - 120.0)
    spine = np.exp(-0.5 * ((ax - 0.5) / 0.03) ** 2) * (ay > 0.08)
    img += 70.0 * spine

    if label == 1 and subtype == "bacteria":
        img += blob_amp * np.exp(-0.5 * (((yy - blob_cy) / sy) ** 2 + ((xx - blob_cx) / sx) ** 2))
    elif label == 1:
        vy, vx = _VIRAL_SPREAD * sy, _VIRAL_SPREAD * sx
        for cx in (blob_cx, 1.0 - blob_cx):
            img += _VIRAL_AMPLITUDE * blob_amp * np.exp(-0.5 * (((yy - blob_cy) / vy) ** 2 + ((xx - cx) / vx) ** 2))

    img = (img - 80.0) * contrast + 80.0 + offset + noise
    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_kermany_like(
    root: str | os.PathLike,
    n_train_per_class: int = 24,
    n_val_per_class: int = 4,
    n_test_per_class: int = 8,
    image_size: int = 64,
    images_per_patient: int = 2,
    seed: int = 0,
    fmt: str = "jpeg",
    subtype_signal: bool = False,
) -> Path:
    """Write a synthetic data set as ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.<fmt>``.

    File names follow Kermany: NORMAL ``IM-<NNNN>-<kkkk>`` (every third patient
    ``NORMAL2-IM-<NNNN>-<kkkk>``), PNEUMONIA ``person<N>_bacteria_<k>`` or
    ``person<N>_virus_<k>`` (alternating patients; ``k`` counts images per kind over the
    whole set, as in the original). Each patient has ``images_per_patient`` images in one
    split; patient numbers are unique over the whole set (both classes, all splits), so a
    patient never appears in two splits. Most images are saved as 8-bit grayscale, every
    ninth as RGB, like the mix in the real data. ``fmt`` is ``"jpeg"`` or ``"png"``.
    With ``subtype_signal`` the viral files carry the viral pattern of :func:`synthetic_xray`
    (for the bacterial-vs-viral and three-class tasks); without it every PNEUMONIA image
    carries the bacterial one.

    Deterministic: the same arguments give byte-identical files. Existing files with
    the same names are overwritten; other files under ``root`` are left alone.
    Returns ``root`` as a Path.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"fmt must be 'jpeg' or 'png', got {fmt!r}")
    if images_per_patient < 1:
        raise ValueError(f"images_per_patient must be >= 1, got {images_per_patient!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    patient_numbers = itertools.count(1)
    pneumonia_k = {"bacteria": itertools.count(1), "virus": itertools.count(1)}
    n_written = 0
    per_split = zip(SPLITS, (n_train_per_class, n_val_per_class, n_test_per_class), strict=True)
    for split, n_per_class in per_split:
        for label, class_name in enumerate(CLASS_NAMES):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(int(n_per_class)):
                j, k = divmod(i, images_per_patient)  # j: patient index here, k: its image
                if k == 0:
                    patient = next(patient_numbers)
                if label == 0:
                    prefix = "NORMAL2-IM" if j % 3 == 2 else "IM"
                    stem = f"{prefix}-{patient:04d}-{k + 1:04d}"
                else:
                    kind = "virus" if j % 2 else "bacteria"
                    stem = f"person{patient}_{kind}_{next(pneumonia_k[kind])}"
                subtype = kind if label == 1 and subtype_signal else "bacteria"
                pixels = synthetic_xray(label, rng, image_size, subtype)
                image = Image.fromarray(pixels if n_written % 9 == 4 else pixels[:, :, 0])
                path = folder / f"{stem}.{fmt}"
                if fmt == "jpeg":
                    image.save(path, format="JPEG", quality=95)
                else:
                    image.save(path, format="PNG")
                n_written += 1
    return root


NIH_TABLE_COLUMNS: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)
"""The columns of the NIH ChestX-ray14 label table ``Data_Entry_2017_v2020.csv``."""

_NIH_PNEUMONIA_LABELS = ("Pneumonia", "Effusion|Pneumonia", "Infiltration|Pneumonia", "Pneumonia|Atelectasis")
_NIH_OTHER_LABELS = ("Effusion", "Infiltration", "Atelectasis", "Effusion|Infiltration", "Cardiomegaly", "Nodule")


def make_nih_like(
    root: str | os.PathLike,
    n_patients: int = 60,
    max_images_per_patient: int = 3,
    image_size: int = 64,
    seed: int = 0,
    n_missing: int = 3,
    csv_name: str = "Data_Entry_2017.csv",
) -> Path:
    """Write a synthetic NIH ChestX-ray14-style set: ``root/images/*.png`` and ``root/<csv_name>``.

    File names follow NIH, ``%08d_%03d.png`` (patient number, follow-up number), and the
    table has the NIH columns (:data:`NIH_TABLE_COLUMNS`). Patients come in three kinds, in
    turn 2:2:1: *pneumonia* patients (first image ``Pneumonia``, ``Effusion|Pneumonia``, ...;
    each later image a pneumonia label with probability 0.7, else a ``No Finding``
    follow-up, so one patient can hold both classes), *normal* patients (``No Finding``, now
    and then an ``Effusion``-style finding) and *other* patients (other findings only, which
    a pneumonia loader drops). Each patient has 1 to ``max_images_per_patient`` images.
    Every image whose labels contain ``Pneumonia`` carries the planted opacity of
    :func:`synthetic_xray`; all others are drawn as NORMAL. Images are 8-bit grayscale PNG,
    a few RGB and RGBA ones as in the shared copy. The last ``n_missing`` rows (new
    patients, alternately ``Pneumonia`` and ``No Finding``) have **no image file**, to
    exercise missing-image reporting.

    Deterministic: the same arguments give the same table and byte-identical images.
    Returns ``root`` as a Path.
    """
    if n_patients < 1 or max_images_per_patient < 1 or n_missing < 0:
        raise ValueError("n_patients and max_images_per_patient must be >= 1 and n_missing >= 0")
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []

    def row(patient: int, follow_up: int, labels: str) -> tuple:
        return (
            f"{patient:08d}_{follow_up:03d}.png", labels, follow_up, patient,
            int(rng.integers(18, 90)), "MF"[patient % 2], ("PA", "AP")[follow_up % 2],
            2048, 2500, 0.143, 0.143,
        )

    for patient in range(1, n_patients + 1):
        kind = ("pneumonia", "pneumonia", "normal", "normal", "other")[(patient - 1) % 5]
        for follow_up in range(int(rng.integers(1, max_images_per_patient + 1))):
            pick = int(rng.integers(0, 1_000_000))
            if kind == "pneumonia":
                positive = follow_up == 0 or rng.random() < 0.7
                labels = _NIH_PNEUMONIA_LABELS[pick % len(_NIH_PNEUMONIA_LABELS)] if positive else "No Finding"
            elif kind == "normal":
                labels = "No Finding" if rng.random() < 0.85 else _NIH_OTHER_LABELS[pick % len(_NIH_OTHER_LABELS)]
            else:
                labels = _NIH_OTHER_LABELS[pick % len(_NIH_OTHER_LABELS)]
            rows.append(row(patient, follow_up, labels))
    for i, (name, labels, *_rest) in enumerate(rows):
        label = int("pneumonia" in labels.casefold().split("|"))
        pixels = synthetic_xray(label, rng, image_size)
        if i % 11 == 5:
            image = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]), "RGBA")
        elif i % 7 == 3:
            image = Image.fromarray(pixels)
        else:
            image = Image.fromarray(pixels[:, :, 0])
        image.save(images / name, format="PNG")
    for k in range(n_missing):
        rows.append(row(n_patients + 1 + k, 0, ("Pneumonia", "No Finding")[k % 2]))
    lines = [",".join(NIH_TABLE_COLUMNS)]
    lines += [",".join(str(v) for v in r) for r in rows]
    (root / csv_name).write_text("\n".join(lines) + "\n")
    return root


def _count(root: Path) -> dict[tuple[str, str], int]:
    return {
        (split, name): sum(1 for p in (root / split / name).iterdir() if p.is_file())
        for split in SPLITS
        for name in CLASS_NAMES
    }


def main(argv: list[str] | None = None) -> int:
    """``python tests/synthetic.py DEST ...``: write a data set and print counts."""
    parser = argparse.ArgumentParser(
        prog="python tests/synthetic.py",
        description="Write a small synthetic Kermany-style chest X-ray data set "
        "(DEST/{train,val,test}/{NORMAL,PNEUMONIA}/), or with --kind nih an NIH-style one "
        "(DEST/images/*.png + DEST/Data_Entry_2017.csv).",
    )
    parser.add_argument("dest", type=Path, help="output folder (created if missing)")
    parser.add_argument("--kind", choices=("kermany", "nih"), default="kermany",
                        help="data set layout (default kermany)")
    parser.add_argument("--patients", type=int, default=60,
                        help="--kind nih: number of patients (default 60)")
    parser.add_argument("--missing", type=int, default=3,
                        help="--kind nih: table rows without an image file (default 3)")
    parser.add_argument(
        "--per-class", type=int, default=24,
        help="training images per class (default 24); val gets 1/6 and test 1/3 of it",
    )
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels (64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--images-per-patient", type=int, default=2)
    parser.add_argument("--fmt", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--subtypes", action="store_true",
                        help="viral PNEUMONIA files carry a viral pattern (two faint bilateral "
                        "opacities) instead of the bacterial one (a single dense opacity)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be >= 1")
    if args.kind == "nih":
        if args.patients < 1 or args.missing < 0:
            parser.error("--patients must be >= 1 and --missing >= 0")
        root = make_nih_like(args.dest, n_patients=args.patients, image_size=args.image_size,
                             seed=args.seed, n_missing=args.missing)
        table = (root / "Data_Entry_2017.csv").read_text().splitlines()[1:]
        findings = [line.split(",")[1] for line in table]
        n_pneumonia = sum("pneumonia" in f.casefold().split("|") for f in findings)
        n_normal = findings.count("No Finding")
        print(f"wrote {len(table) - args.missing} synthetic images and a {len(table)}-row table "
              f"to {root}")
        print(f"  rows: Pneumonia {n_pneumonia}, No Finding {n_normal}, other "
              f"{len(table) - n_pneumonia - n_normal}; {args.missing} row(s) without an image file")
        return 0

    n = args.per_class
    root = make_kermany_like(
        args.dest,
        n_train_per_class=n,
        n_val_per_class=max(1, round(n / 6)),
        n_test_per_class=max(1, round(n / 3)),
        image_size=args.image_size,
        images_per_patient=args.images_per_patient,
        seed=args.seed,
        fmt=args.fmt,
        subtype_signal=args.subtypes,
    )
    counts = _count(root)
    print(f"wrote {sum(counts.values())} synthetic images to {root}")
    for split in SPLITS:
        parts = ", ".join(f"{name} {counts[split, name]}" for name in CLASS_NAMES)
        print(f"  {split}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
