"""Small synthetic chest-X-ray-like data sets in the Kermany folder layout, for tests.

The real data set (Kermany et al. 2018) is 1.2 GB and needs a download; tests and CI need
something that builds in well under a second, has the same folder structure and file
names (so patient-id parsing and grouped splits are exercised) and holds a learnable,
localised signal (so training, AUC and Grad-CAM checks are meaningful):

* every image has a dark background, a soft-tissue "thorax", two elliptical lung fields
  with a darker interior, a bright spine band, noise, brightness/contrast jitter and a
  small random shift;
* PNEUMONIA images also get a soft bright opacity (a Gaussian blob) placed at a random
  spot entirely inside :data:`SIGNAL_BOX` (the lower part of the lung on the image's
  left). The blob adds less than one grey level to the image mean while the brightness
  jitter is +-25, so a mean-brightness classifier is near chance but a small CNN finds
  the blob within a few epochs.

Command line: ``python -m pneumo_utils.synthetic DEST [--per-class N] [--image-size S]
[--seed S]`` writes ``DEST/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``.
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

__all__ = ["SIGNAL_BOX", "SPLITS", "make_kermany_like", "synthetic_xray"]

SIGNAL_BOX: tuple[float, float, float, float] = (0.5, 0.15, 0.85, 0.45)
"""``(y0, x0, y1, x1)`` as fractions of the image height/width: where the PNEUMONIA
opacity is planted (to 2.5 sigma of the blob; nothing of it is visible outside)."""

SPLITS: tuple[str, str, str] = ("train", "val", "test")

_BLOB_SIGMA = (0.055, 0.045)  # (y, x) as fractions of the image size
_BLOB_AMPLITUDE = (80.0, 110.0)  # grey levels added at the blob centre, before contrast
_BLOB_MARGIN = 2.5  # blob centre stays this many sigmas inside SIGNAL_BOX
_MAX_SHIFT_PX = 3
_BRIGHTNESS_JITTER = 25.0  # grey levels, uniform +-
_CONTRAST_JITTER = 0.2  # relative, uniform +-
_NOISE_SD = 6.0


def _soft_ellipse(yy, xx, cy, cx, ry, rx, edge=0.08):
    """1 inside the ellipse, 0 outside, with a smooth edge; also returns the normalised
    radius (0 at the centre, 1 on the rim)."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge)), r


def synthetic_xray(label: int, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """One synthetic frontal chest X-ray, ``(image_size, image_size, 3)`` uint8 gray-in-RGB.

    ``label`` 0 is NORMAL, 1 is PNEUMONIA (a bright opacity inside :data:`SIGNAL_BOX`).
    All randomness comes from ``rng``, and the number of draws does not depend on the
    label, so the same generator state gives the same anatomy for both classes.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (NORMAL) or 1 (PNEUMONIA), got {label!r}")
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

    if label == 1:
        img += blob_amp * np.exp(
            -0.5 * (((yy - blob_cy) / sy) ** 2 + ((xx - blob_cx) / sx) ** 2)
        )

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
) -> Path:
    """Write a synthetic data set as ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.<fmt>``.

    File names follow Kermany: NORMAL ``IM-<NNNN>-<kkkk>`` (every third patient
    ``NORMAL2-IM-<NNNN>-<kkkk>``), PNEUMONIA ``person<N>_bacteria_<k>`` or
    ``person<N>_virus_<k>`` (alternating patients; ``k`` counts images per kind over the
    whole set, as in the original). Each patient has ``images_per_patient`` images in one
    split; patient numbers are unique over the whole set (both classes, all splits), so a
    patient never appears in two splits. Most images are saved as 8-bit grayscale, every
    ninth as RGB, like the mix in the real data. ``fmt`` is ``"jpeg"`` or ``"png"``.

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
    per_split = zip(SPLITS, (n_train_per_class, n_val_per_class, n_test_per_class))
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
                pixels = synthetic_xray(label, rng, image_size)
                image = Image.fromarray(pixels if n_written % 9 == 4 else pixels[:, :, 0])
                path = folder / f"{stem}.{fmt}"
                if fmt == "jpeg":
                    image.save(path, format="JPEG", quality=95)
                else:
                    image.save(path, format="PNG")
                n_written += 1
    return root


def _count(root: Path) -> dict[tuple[str, str], int]:
    return {
        (split, name): sum(1 for p in (root / split / name).iterdir() if p.is_file())
        for split in SPLITS
        for name in CLASS_NAMES
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pneumo_utils.synthetic DEST ...``: write a data set and print counts."""
    parser = argparse.ArgumentParser(
        prog="python -m pneumo_utils.synthetic",
        description="Write a small synthetic Kermany-style chest X-ray data set "
        "(DEST/{train,val,test}/{NORMAL,PNEUMONIA}/).",
    )
    parser.add_argument("dest", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--per-class", type=int, default=24,
        help="training images per class (default 24); val gets 1/6 and test 1/3 of it",
    )
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels (64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--images-per-patient", type=int, default=2)
    parser.add_argument("--fmt", choices=("jpeg", "png"), default="jpeg")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be >= 1")

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
    )
    counts = _count(root)
    print(f"wrote {sum(counts.values())} synthetic images to {root}")
    for split in SPLITS:
        parts = ", ".join(f"{name} {counts[split, name]}" for name in CLASS_NAMES)
        print(f"  {split}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
