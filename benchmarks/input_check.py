"""How well a model's input check tells chest X-rays like its training images from everything else.

For a saved model with an input check (:mod:`pneumo_utils.model.input_check`; notebooks 01, 03
and 04 fit one when they save), every image below goes through the pipeline ``predict`` uses,
and the script prints, per set, the share of images beyond the check's limit and the AUROC of
the check's score between that set and the same-source hold-out (``test/``, in distribution):

- in distribution: the hold-out and external validation A (goal: at most 3% flagged);
- out of distribution: natural photographs (scikit-learn's sample images, scikit-image's when
  it is installed, and crops of them), generated scenes (sky, ground, coloured shapes), blank
  images, noise, rendered text pages, hold-out X-rays rotated by 90/180/270 degrees, inverted,
  or heavily cropped (the centre 35%, enlarged), and NIH ChestX-ray14 adult X-rays (another
  population, not an error: the check says how far they are, which is the question).

A model saved without a check gets one fitted here on the split notebook 03 uses (seed 42),
exactly as the notebook would (``--fit``), so the figures describe the notebook's check.

    python benchmarks/input_check.py --model saved_models/03_mobilenetv2_finetune.keras \\
        --data-root ../shared/data/chest_xray --external-dir ../shared/data/chest_xray_official_test_a \\
        --nih-dir ../shared/data/nih/images

About a minute for MobileNetV2 at 160 px on 2 CPU cores. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import kermany, splits
from pneumo_utils.model import input_check, saving

GENERATED = 40
"""Images per generated out-of-distribution set."""


def _save(folder: Path, name: str, pixels: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return str(path)


def photographs(folder: Path, rng: np.random.Generator) -> tuple[list[str], str]:
    """Sample photographs and random crops of them (square, 40-100% of the short side)."""
    from sklearn.datasets import load_sample_images

    sources = {f"sklearn_{i}": image for i, image in enumerate(load_sample_images().images)}
    note = "scikit-learn's 2 sample photos"
    try:
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                     "retina", "colorwheel", "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel"):
            image = getattr(skdata, name)()
            sources[name] = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        note = f"{len(sources)} sample photos of scikit-learn and scikit-image"
    except ImportError:
        note += " (pip install scikit-image for 16 more)"
    paths = []
    for name, image in sources.items():
        image = np.asarray(image, dtype=np.uint8)
        paths.append(_save(folder, name, image))
        side = min(image.shape[:2])
        for k in range(3):
            size = int(side * rng.uniform(0.4, 1.0))
            y, x = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
            paths.append(_save(folder, f"{name}_crop{k}", image[y:y + size, x:x + size]))
    return paths, note + ", each with 3 random crops"


def scenes(folder: Path, rng: np.random.Generator, size: int = 256) -> list[str]:
    """Generated outdoor-like scenes: a sky gradient, a ground colour and a few coloured shapes."""
    paths = []
    for i in range(GENERATED):
        sky, ground = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, size)[:, None, None]
        pixels = ((1 - t) * sky + t * rng.integers(0, 256, 3)) * np.ones((1, size, 1))
        horizon = rng.integers(size // 3, 2 * size // 3)
        pixels[horizon:] = ground
        picture = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(rng.integers(3, 9)):
            x0, y0 = rng.integers(0, size, 2)
            box = [x0, y0, x0 + rng.integers(10, 90), y0 + rng.integers(10, 90)]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        paths.append(_save(folder, f"scene{i}", np.asarray(picture)))
    return paths


def blanks_and_noise(folder: Path, rng: np.random.Generator, size: int = 224) -> dict[str, list[str]]:
    levels = np.linspace(0, 255, GENERATED).astype(np.uint8)
    return {
        "blank (uniform grey 0-255)": [_save(folder, f"blank{i}", np.full((size, size, 3), v, np.uint8))
                                       for i, v in enumerate(levels)],
        "noise (uniform, Gaussian, grey or colour)": [
            _save(folder, f"noise{i}", (rng.integers(0, 256, (size, size, 3)) if i % 2 else
                                        np.clip(rng.normal(128, 50, (size, size, 1 if i % 4 else 3)), 0, 255)
                                        * np.ones((1, 1, 3))).astype(np.uint8))
            for i in range(GENERATED)],
    }


def text_pages(folder: Path, rng: np.random.Generator, size: int = 400) -> list[str]:
    """Rendered text pages: lines of random words on a light page."""
    words = "patient chest radiograph report findings impression normal clear lungs no acute".split()
    paths = []
    for i in range(GENERATED):
        page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(220, 256, 3)))
        draw = ImageDraw.Draw(page)
        for line in range(rng.integers(8, 25)):
            text = " ".join(rng.choice(words, rng.integers(3, 8)))
            draw.text((10, 10 + line * 15), text, fill=(0, 0, 0))
        paths.append(_save(folder, f"page{i}", np.asarray(page)))
    return paths


def transformed_xrays(folder: Path, sources: list[str], size: int) -> dict[str, list[str]]:
    """Hold-out X-rays rotated, inverted or heavily cropped."""
    from pneumo_utils.data.images import read_resized

    sets: dict[str, list[str]] = {"X-rays rotated 90/180/270 deg": [], "X-rays inverted": [],
                                  "X-rays, centre 35% crop": []}
    for i, path in enumerate(sources):
        image = read_resized(path, size)
        sets["X-rays rotated 90/180/270 deg"].append(_save(folder, f"rot{i}", np.rot90(image, k=1 + i % 3)))
        sets["X-rays inverted"].append(_save(folder, f"inv{i}", 255 - image))
        c = int(size * 0.35) // 2
        sets["X-rays, centre 35% crop"].append(_save(folder, f"crop{i}", image[size // 2 - c:size // 2 + c,
                                                                               size // 2 - c:size // 2 + c]))
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="saved_models/03_mobilenetv2_finetune.keras")
    parser.add_argument("--data-root", default="../shared/data/chest_xray")
    parser.add_argument("--external-dir", default="../shared/data/chest_xray_official_test_a")
    parser.add_argument("--nih-dir", default="../shared/data/nih/images")
    parser.add_argument("--transformed", type=int, default=120, help="hold-out X-rays per transformed set")
    parser.add_argument("--seed", type=int, default=42, help="the notebooks' split seed (for --fit)")
    args = parser.parse_args(argv)

    model, meta = saving.load_model(args.model)
    check = input_check.of(meta)
    index = splits.kermany_split(args.data_root, seed=args.seed)
    paths, _ = splits.split_files(index)
    if check is None:
        print(f"{args.model} has no input check: fitting it as the notebooks do (split seed {args.seed})")
        check = input_check.fit(model, paths["train"], paths["val"], seed=args.seed)
    print(f"check: {check.fitted_on}; limits " + ", ".join(f"{v} {limit:.3f}" for v, limit in check.limits.items())
          + f"; {check.limit_rule}")
    size = int(meta["image_size"])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        photos, photo_note = photographs(work / "photos", rng)
        sets = {
            "hold-out test (same source)": paths["test"],
            "external validation A": kermany.load_class_folder(args.external_dir)["path"].tolist(),
            f"photographs ({photo_note})": photos,
            "generated scenes": scenes(work / "scenes", rng),
            **blanks_and_noise(work / "blank", rng),
            "rendered text pages": text_pages(work / "pages", rng),
            **transformed_xrays(work / "xray", list(rng.choice(paths["test"], args.transformed, replace=False)), size),
        }
        nih = sorted(str(p) for p in Path(args.nih_dir).glob("*.png")) if Path(args.nih_dir).is_dir() else []
        if nih:
            sets["NIH ChestX-ray14 adults (64 px originals)"] = nih
        looks = {name: input_check.looks_of(model, files) for name, files in sets.items()}
    reference = looks["hold-out test (same source)"]
    ratio_in = check.ratios(reference)
    print(f"\n{'set':<58} {'images':>6} {'flagged':>8} {'by features':>11} {'by thumbnail':>12} {'AUROC':>7}")
    for name, seen in looks.items():
        scores, ratios = check.scores(seen), check.ratios(seen)
        by = {view: np.mean(s > check.limits[view]) for view, s in scores.items()}
        auroc = "" if seen is reference else f"{roc_auc_score(np.r_[np.zeros(len(ratio_in)), np.ones(len(ratios))], np.r_[ratio_in, ratios]):.4f}"
        print(f"{name[:58]:<58} {len(seen):>6} {np.mean(ratios > 1):>8.1%} {by['features']:>11.1%} "
              f"{by['thumbnail']:>12.1%} {auroc:>7}")
    print("\nAUROC: the check's score (the larger of score / limit over the two views) between the set "
          "and the hold-out; flagged: beyond either view's limit.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
