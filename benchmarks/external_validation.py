"""Score training recipes on labelled external validation (half A of Kermany's official test).

Every recipe trains a head on cached features of a frozen ImageNet backbone, on the
patient-grouped training split carved from Kermany's train folder (seed 42), exactly as the
notebooks do; the threshold is chosen on validation (Youden's J). Nothing is fitted on the
external images: they are scored zero-shot. Per recipe and head seed the script prints
validation AUC, the selection score (shortcut check on validation,
:mod:`pneumo_utils.evaluation.shortcuts`), the same-source hold-out AUC (``test/``), and on external
validation the AUC, accuracy, sensitivity and specificity at the validation threshold, plus the
accuracy a threshold chosen on the external set itself would give (an upper bound, not a
result). Then it scores probability-averaged ensembles of the recipes' models and the rank
correlation between each training-side figure and the external AUC.

Recipes (``--recipes``): ``raw``, ``cue`` (centre crop 0.8 + histogram equalisation),
``cue+fs`` (and frame-swapped training copies, the notebooks' recipe), ``cue+fs+stretch``
(and a copy of each training image stretched horizontally by a random factor in 0.75-1.33:
the 224 x 224 resize turned the originals' class-dependent aspect ratio into shape).

    python benchmarks/external_validation.py --data-root ../shared/data/chest_xray \\
        --external-dir ../shared/data/chest_xray_official_test_a --weights-dir ../shared/weights

Costs on 2 CPU cores: MobileNetV2 at 224 px about 3 minutes per recipe, ResNet50 about 10;
features are cached (``--cache-dir``), so reruns take seconds. Writes ``--out`` (CSV of every
row) and ``--proba`` (NPZ of every model's probabilities, for further ensembles).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import frames, kermany, pipelines, splits
from pneumo_utils.evaluation import metrics, shortcuts
from pneumo_utils.model import backbones, features, train

RECIPES = {
    "raw": {"remove_cues": False, "frame_swap": False, "stretch": False},
    "cue": {"remove_cues": True, "frame_swap": False, "stretch": False},
    "cue+fs": {"remove_cues": True, "frame_swap": True, "stretch": False},
    "cue+fs+stretch": {"remove_cues": True, "frame_swap": True, "stretch": True},
}
STRETCH = 0.25
"""Horizontal zoom range of the stretched training copies (Keras ``RandomZoom`` width factor)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data/chest_xray")
    parser.add_argument("--external-dir", default="data/chest_xray_external")
    parser.add_argument("--weights-dir", default=os.environ.get("PNEUMO_WEIGHTS_DIR"))
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2:224", "resnet50:224"],
                        help="backbone:image_size pairs")
    parser.add_argument("--recipes", nargs="+", default=["cue+fs"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cue-images", type=int, default=300)
    parser.add_argument("--cache-dir", default=".cache/pneumo/features")
    parser.add_argument("--out", default="build/external_validation.csv")
    parser.add_argument("--proba", default="build/external_validation.npz")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=NPZ",
                        help="probabilities of other models on the same split (val, test, external arrays, "
                             "e.g. from finetune_external.py --save), scored and ensembled with the rest")
    return parser.parse_args()


def stretched_features(model, paths: list[str], cache_dir: str, seed: int = 0) -> np.ndarray:
    """Pooled features of ``paths`` each stretched horizontally by a random factor, cached."""
    import keras
    import tensorflow as tf

    extractor = backbones.pooled_features_model(model)
    size = int(extractor.inputs[0].shape[1])
    key = hashlib.sha256("|".join([features.weights_fingerprint(extractor), features.files_fingerprint(paths),
                                   str(size), f"stretch={STRETCH}", str(seed)]).encode()).hexdigest()[:24]
    cache = Path(cache_dir) / f"{model.name}-stretch-{key}.npy"
    if cache.exists():
        return np.load(cache)
    zoom = keras.layers.RandomZoom(height_factor=(0.0, 0.0), width_factor=(-STRETCH, STRETCH),
                                   fill_mode="reflect", seed=seed)
    dataset = pipelines.image_dataset(paths, image_size=size, batch_size=32, cache=False)
    dataset = dataset.map(lambda x: zoom(x, training=True), num_parallel_calls=tf.data.AUTOTUNE)
    out = extractor.predict(dataset, verbose=0).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


def cue_features(model, paths, labels, n_images: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The shortcut check's validation rows and the pooled features of its four image sets."""
    from sklearn.model_selection import train_test_split

    rows, _ = train_test_split(np.arange(len(paths["val"])), train_size=n_images, stratify=labels["val"],
                               random_state=0)
    refs = frames.other_class_references(labels["val"][rows], labels["train"], seed=0)
    size = int(model.inputs[0].shape[1])
    sets = shortcuts.counterfactuals(pipelines.load_images([paths["val"][i] for i in rows], size),
                                     pipelines.load_images([paths["train"][j] for j in refs], size))
    extractor = backbones.pooled_features_model(model)
    return rows, {name: extractor.predict(images, batch_size=32, verbose=0) for name, images in sets.items()}


def external_figures(y: np.ndarray, proba: np.ndarray, threshold: float) -> dict:
    """AUC, accuracy, sensitivity, specificity at ``threshold``; best accuracy over thresholds."""
    figures = metrics.binary_metrics(y, proba, threshold)
    best = max(float(np.mean((proba >= t) == y)) for t in np.unique(proba))
    return {"ext auc": figures["auc"], "ext accuracy": figures["accuracy"],
            "ext sensitivity": figures["sensitivity"], "ext specificity": figures["specificity"],
            "ext best accuracy": best}


def recipe_rows(backbone: str, size: int, recipe: str, args, paths, labels, proba_out: dict) -> list[dict]:
    """Train one head per seed for ``backbone`` at ``size`` under ``recipe`` and score it."""
    spec = RECIPES[recipe]
    weights = backbones.resolve_weights(backbone, "imagenet")
    model = backbones.build_classifier(backbone, size, weights, seed=0, remove_cues=spec["remove_cues"])
    feats, x_train, y_train = features.extract_with_frame_swaps(
        model, paths, labels, frame_swap=spec["frame_swap"], seed=42, cache_dir=args.cache_dir)
    if spec["stretch"]:
        x_train = np.concatenate([x_train, stretched_features(model, paths["train"], args.cache_dir)])
        y_train = np.concatenate([y_train, labels["train"]])
    cue_rows, cue_sets = cue_features(model, paths, labels, args.cue_images)
    rows = []
    for seed in args.seeds:
        model = backbones.build_classifier(backbone, size, weights, seed=seed, remove_cues=spec["remove_cues"])
        train.fit_head_on_features(model, x_train, y_train, feats["val"], labels["val"], epochs=40,
                                   class_weight=pipelines.class_weights(y_train), patience=8, seed=seed)
        head = backbones.head_on_features(model)
        proba = {split: head.predict(feats[split], verbose=0).ravel() for split in paths}
        threshold = metrics.choose_threshold(labels["val"], proba["val"], rule="youden")
        cue = shortcuts.cue_test(lambda f, head=head: head.predict(f, verbose=0).ravel(), cue_sets,
                                 labels["val"][cue_rows], threshold)
        name = f"{backbone}:{size}:{recipe}:{seed}"
        proba_out[name] = proba
        row = {"model": name, "backbone": backbone, "size": size, "recipe": recipe, "seed": seed,
               "threshold": threshold, "val auc": roc_auc_score(labels["val"], proba["val"]),
               "selection score": shortcuts.selection_score(cue),
               "holdout auc": roc_auc_score(labels["test"], proba["test"]),
               **external_figures(labels["external"], proba["external"], threshold)}
        rows.append(row)
        print(pd.Series(row).to_frame().T.round(4).to_string(index=False), flush=True)
    return rows


def ensemble_rows(proba: dict, labels) -> list[dict]:
    """Probability-averaged ensembles: all seeds of one recipe, and one seed of each recipe
    combined across recipes (every subset of two or more), threshold by Youden on validation."""
    groups: dict[str, list[str]] = {}
    for name in proba:
        groups.setdefault(name.rsplit(":", 1)[0], []).append(name)
    candidates = {f"{key} (all seeds)": names for key, names in groups.items() if len(names) > 1}
    keys = sorted(groups)
    for k in range(2, len(keys) + 1):
        for combo in itertools.combinations(keys, k):
            candidates[" + ".join(combo) + " (all seeds)"] = [n for key in combo for n in groups[key]]
    rows = []
    for name, members in candidates.items():
        mean = {split: np.mean([proba[m][split] for m in members], axis=0) for split in ("val", "test", "external")}
        threshold = metrics.choose_threshold(labels["val"], mean["val"], rule="youden")
        row = {"model": name, "recipe": "ensemble", "threshold": threshold,
               "val auc": roc_auc_score(labels["val"], mean["val"]),
               "holdout auc": roc_auc_score(labels["test"], mean["test"]),
               **external_figures(labels["external"], mean["external"], threshold)}
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    if args.weights_dir:
        os.environ["PNEUMO_WEIGHTS_DIR"] = args.weights_dir
    index = splits.kermany_split(args.data_root, seed=42)
    external = kermany.load_class_folder(args.external_dir, split="external")
    paths, labels = splits.split_files(pd.concat([index, external], ignore_index=True),
                                     splits=("train", "val", "test", "external"))
    proba: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for item, recipe in itertools.product(args.models, args.recipes):
        backbone, size = item.split(":")
        rows += recipe_rows(backbone, int(size), recipe, args, paths, labels, proba)
    for item in args.extra:
        name, _, file = item.partition("=")
        stored = np.load(file)
        proba[f"{name}:0"] = {split: stored[split] for split in ("val", "test", "external")}
        threshold = metrics.choose_threshold(labels["val"], stored["val"], rule="youden")
        rows.append({"model": f"{name}:0", "backbone": name, "recipe": "extra", "seed": 0, "threshold": threshold,
                     "val auc": roc_auc_score(labels["val"], stored["val"]),
                     "holdout auc": roc_auc_score(labels["test"], stored["test"]),
                     **external_figures(labels["external"], stored["external"], threshold)})
    singles = pd.DataFrame(rows)
    table = pd.concat([singles, pd.DataFrame(ensemble_rows(proba, labels))], ignore_index=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    table.to_csv(args.out, index=False)
    np.savez(args.proba, **{f"{name}|{split}": p for name, by_split in proba.items() for split, p in by_split.items()},
             **{f"labels|{split}": y for split, y in labels.items()})
    columns = ["val auc", "selection score", "holdout auc", "ext auc", "ext accuracy", "ext sensitivity",
               "ext specificity", "ext best accuracy"]
    print("\nmean over head seeds")
    print(singles.groupby(["backbone", "size", "recipe"], dropna=False)[columns].mean().round(4).to_string())
    print("\nensembles (probability mean, threshold by Youden on validation)")
    print(table[table["recipe"] == "ensemble"].set_index("model")[columns[:1] + columns[2:]].round(4).to_string())
    if len(singles) >= 3:
        print("\nSpearman rank correlation with external AUC, over the single models")
        for column in ("val auc", "selection score", "holdout auc"):
            scored = singles.dropna(subset=[column])
            rho = spearmanr(scored[column], scored["ext auc"]).statistic
            print(f"  {column}: {rho:+.2f} ({len(scored)} models)")


if __name__ == "__main__":
    main()
