"""Rank ideas for generalisation on validation data and the acquisition-shift proxy.

Frozen ImageNet backbones at one image size; for each, heads trained on cached features
(three seeds, with and without label smoothing), a logistic regression (C chosen on
validation AUC), optional heads trained on augmented copies of the training images, and
the two-backbone ensembles. Every figure comes from the patient-grouped *validation* split
and from perturbed copies of it (:mod:`pneumo_utils.shift`); test images are never read.

    python benchmarks/generalisation.py --data-root ../shared/data/chest_xray \\
        --weights-dir ../shared/weights [--backbones mobilenet_v2 resnet50] [--augmented-views 2]

Prints one table (and writes it as CSV to ``--out``): validation AUC, mean and worst AUC
over the perturbations, and mean accuracy / false-positive rate under the perturbations at
thresholds from several validation-only rules. Takes about 25 minutes on 2 CPU cores for
both backbones at 224 px (ResNet50 features dominate), a few seconds with a warm cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pneumo_utils import augment, data, models, train
from pneumo_utils.evaluate import choose_threshold
from pneumo_utils.features import extract_split_features, pooled_features_model
from pneumo_utils.shift import PERTURBATIONS, perturbed_batches, shift_metrics

SEEDS = (42, 43, 44)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data/chest_xray")
    parser.add_argument("--weights-dir", default=os.environ.get("PNEUMO_WEIGHTS_DIR"))
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--augmented-views", type=int, default=0,
                        help="augmented copies of the training images for extra heads (0: none)")
    parser.add_argument("--cache-dir", default=".cache/pneumo/features")
    parser.add_argument("--out", default="build/generalisation.csv")
    return parser.parse_args()


def backbone_features(name: str, size: int, paths: dict, cache_dir: str, views: int) -> dict[str, np.ndarray]:
    """Clean train/val features, perturbed val features and augmented train views, cached."""
    model = models.build_classifier(name, size, models.resolve_weights(name, "imagenet"), seed=42)
    feats = extract_split_features(model, {s: paths[s] for s in ("train", "val")}, 32, cache_dir)
    extractor = pooled_features_model(model)
    cache = Path(cache_dir) / f"generalisation-{name}-{size}"
    cache.mkdir(parents=True, exist_ok=True)
    val_images = None
    for kind in PERTURBATIONS:
        file = cache / f"val-{kind}.npy"
        if not file.is_file():
            val_images = data.load_images(paths["val"], size) if val_images is None else val_images
            batch = perturbed_batches(val_images, [kind])[kind]
            np.save(file, extractor.predict(batch, batch_size=32, verbose=0))
        feats[kind] = np.load(file)
    layers = augment.augmentation(seed=7)
    for view in range(views):
        file = cache / f"train-augmented-{view}.npy"
        if not file.is_file():
            images = data.load_images(paths["train"], size)
            out = [extractor.predict(layers(tf.constant(images[i: i + 64]), training=True), verbose=0)
                   for i in range(0, len(images), 64)]
            np.save(file, np.concatenate(out))
        feats[f"train_aug{view}"] = np.load(file)
    return feats


def keras_head(feats, y, name, size, seed, label_smoothing=0.0, augmented=False) -> dict:
    """Probabilities on val and every perturbation from one seeded head."""
    x_train, y_train = feats["train"], y["train"]
    if augmented:
        views = [feats[k] for k in feats if k.startswith("train_aug")]
        x_train = np.concatenate([x_train, *views])
        y_train = np.concatenate([y_train] * (1 + len(views)))
    data.set_seed(seed)
    head = models.head_on_features(models.build_classifier(name, size, None, seed=seed))
    train.compile_binary(head, 1e-3, label_smoothing)
    train.fit(head, (x_train, y_train.astype("float32")), (feats["val"], y["val"].astype("float32")),
              40, data.class_weights(y_train), 8, verbose=0, batch_size=32, shuffle=True)
    return {k: head.predict(feats[k], verbose=0).reshape(-1) for k in ("val", *PERTURBATIONS)}


def logistic_head(feats, y) -> dict:
    """Standardised logistic regression, C chosen on validation AUC."""
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 1.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000))
        clf.fit(feats["train"], y["train"])
        auc = skm.roc_auc_score(y["val"], clf.predict_proba(feats["val"])[:, 1])
        best = max(best or (auc, c, clf), (auc, c, clf), key=lambda t: t[0])
    return {k: best[2].predict_proba(feats[k])[:, 1] for k in ("val", *PERTURBATIONS)}


def thresholds(y_val: np.ndarray, p_val: np.ndarray) -> dict[str, float]:
    """Validation-only threshold rules compared under shift."""
    fpr, tpr, th = skm.roc_curve(y_val, p_val)
    th = np.clip(th, 0, 1)
    j = tpr - fpr
    near = th[j >= j.max() - 0.01]
    logit = np.log(np.clip(near, 1e-7, 1 - 1e-7) / (1 - np.clip(near, 1e-7, 1 - 1e-7)))
    rules = {"youden": choose_threshold(y_val, p_val, "youden"), "fixed 0.5": 0.5,
             "plateau centre": 1 / (1 + np.exp(-np.median(logit)))}
    for target in (0.98, 0.99):
        rules[f"specificity {target}"] = th[np.where(1 - fpr >= target)[0][-1]]
    return {k: float(v) for k, v in rules.items()}


def summarise(y_val: np.ndarray, proba: dict) -> dict[str, float]:
    row = {"val AUC": skm.roc_auc_score(y_val, proba["val"])}
    for rule, t in thresholds(y_val, proba["val"]).items():
        shifted = pd.DataFrame([shift_metrics(y_val, proba[k], t) for k in PERTURBATIONS])
        row.update({"shift AUC": shifted["auc"].mean(), "worst AUC": shifted["auc"].min()})
        row[f"acc {rule}"], row[f"FPR {rule}"] = shifted["accuracy"].mean(), shifted["fpr"].mean()
    return row


def mean_of(probas: list[dict]) -> dict:
    return {k: np.mean([p[k] for p in probas], axis=0) for k in probas[0]}


def main() -> None:
    args = parse_args()
    if args.weights_dir:
        os.environ["PNEUMO_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
    index = data.kermany_split(args.data_root, 0.15, 42)
    paths, y = data.split_files(index, ("train", "val"))
    rows, heads = {}, {}
    for name in args.backbones:
        feats = backbone_features(name, args.image_size, paths, args.cache_dir, args.augmented_views)
        variants = {"head": {}, "head + label smoothing 0.1": {"label_smoothing": 0.1}}
        if args.augmented_views:
            variants[f"head on {args.augmented_views} augmented views"] = {"augmented": True}
        for variant, kwargs in variants.items():
            per_seed = [keras_head(feats, y, name, args.image_size, s, **kwargs) for s in SEEDS]
            for seed, proba in zip(SEEDS, per_seed, strict=True):
                rows[f"{name} {variant} (seed {seed})"] = summarise(y["val"], proba)
            heads[f"{name} {variant}"] = mean_of(per_seed)
        heads[f"{name} logistic regression"] = logistic_head(feats, y)
    if len(args.backbones) > 1:
        for variant in ("head", "logistic regression"):
            members = [heads[f"{b} {variant}"] for b in args.backbones]
            heads[f"ensemble of {variant}s"] = mean_of(members)
    for name, proba in heads.items():
        rows[f"{name} (seed mean)" if "head" in name and "ensemble" not in name else name] = summarise(y["val"], proba)
    table = pd.DataFrame(rows).T
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.round(4).to_string())
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
