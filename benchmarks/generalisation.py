"""Rank training recipes by the shortcut check on validation images (never on test images).

For each frozen ImageNet backbone and each recipe, a head is trained on cached features of the
patient-grouped training split (as in the notebooks) for a few seeds, and scored on the
validation split: clean, and with each image's grey-level histogram or outer frame taken from a
training image of the other class, or its frame blanked (:mod:`pneumo_utils.evaluation.shortcuts`). The
recipes:

* ``raw``: the backbone on the raw pixels;
* ``cue removal``: centre crop 0.8 and histogram equalisation inside the model;
* ``cue removal + frame swap``: the same, and the head also trains on copies of the training
  images whose outer frame comes from an image of the other class.

    python benchmarks/generalisation.py --data-root ../shared/data/chest_xray \\
        --weights-dir ../shared/weights [--backbones mobilenet_v2 resnet50] [--image-size 224] \\
        [--task pneumonia|bacterial_vs_viral] [--audit-only]

Prints one row per backbone, recipe and seed: the threshold (Youden's J on clean validation),
clean validation AUC, the selection score, and AUC / specificity per counterfactual set. Also
prints the trivial-statistics audit of the training images (``--audit-only``: that alone, in
about a minute). ``--task`` picks a binary task of :mod:`pneumo_utils.data.tasks` (the split is the
notebooks': patient-grouped, stratified by the task's classes, seed 42). ResNet50 features at
224 px cost about 5 minutes per recipe on 2 CPU cores; cached features make reruns take seconds.
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from pneumo_utils.data import frames, kermany, pipelines, splits, tasks
from pneumo_utils.evaluation import shortcuts
from pneumo_utils.evaluation.metrics import choose_threshold
from pneumo_utils.model import backbones, features, train

RECIPES = {"raw": (False, False), "cue removal": (True, False), "cue removal + frame swap": (True, True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data/chest_xray")
    parser.add_argument("--weights-dir", default=os.environ.get("PNEUMO_WEIGHTS_DIR"))
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--cache-dir", default=".cache/pneumo/features")
    parser.add_argument("--out", default="build/generalisation.csv")
    parser.add_argument("--task", default=tasks.DEFAULT_TASK,
                        choices=[name for name, task in tasks.TASKS.items() if task.binary])
    parser.add_argument("--audit-only", action="store_true", help="print the audit and stop")
    return parser.parse_args()


def recipe_rows(backbone, recipe, args, paths, labels, val_sets) -> list[dict]:
    """Train one head per seed for ``backbone`` under ``recipe`` and score it."""
    remove_cues, frame_swap = RECIPES[recipe]
    model = backbones.build_classifier(backbone, args.image_size, backbones.resolve_weights(backbone, "imagenet"),
                                    seed=0, remove_cues=remove_cues)
    feats, x_train, y_train = features.extract_with_frame_swaps(
        model, {"train": paths["train"], "val": paths["val"]}, labels, frame_swap=frame_swap, seed=1,
        cache_dir=args.cache_dir)
    extractor = backbones.pooled_features_model(model)
    set_feats = {name: extractor.predict(images, batch_size=32, verbose=0) for name, images in val_sets.items()}
    rows = []
    for seed in args.seeds:
        train.fit_head_on_features(model, x_train, y_train, feats["val"], labels["val"], epochs=40,
                                   class_weight=pipelines.class_weights(y_train), patience=8, seed=seed)
        head = backbones.head_on_features(model)
        p_val = head.predict(feats["val"], verbose=0).ravel()
        threshold = choose_threshold(labels["val"], p_val, rule="youden")
        table = shortcuts.cue_test(lambda f, head=head: head.predict(f, verbose=0).ravel(), set_feats,
                                   labels["val"], threshold)
        row = {"backbone": backbone, "recipe": recipe, "seed": seed, "threshold": threshold,
               "val auc": float(table.loc["clean", "auc"]), "selection score": shortcuts.selection_score(table)}
        for name in shortcuts.COUNTERFACTUALS:
            row[f"{name} auc"] = table.loc[name, "auc"]
            row[f"{name} specificity"] = table.loc[name, "specificity"]
        rows.append(row)
        print(pd.Series(row).to_frame().T.round(4).to_string(index=False), flush=True)
    return rows


def main() -> None:
    args = parse_args()
    if args.weights_dir:
        os.environ["PNEUMO_WEIGHTS_DIR"] = args.weights_dir
    index = tasks.task_index(kermany.load_kermany(args.data_root), args.task)
    index = splits.grouped_split(index, seed=42)
    paths, labels = splits.split_files(index, splits=("train", "val"))
    audit = shortcuts.audit(shortcuts.image_statistics(pipelines.load_images(paths["train"], 128)), labels["train"],
                            shortcuts.image_statistics(pipelines.load_images(paths["val"], 128)), labels["val"])
    print(f"task {args.task}: trivial statistics, logistic regression fitted on train, validation AUC")
    print(audit.round(3).to_string(), flush=True)
    if args.audit_only:
        return
    val_images = pipelines.load_images(paths["val"], args.image_size)
    references = pipelines.load_images(
        [paths["train"][j] for j in frames.other_class_references(labels["val"], labels["train"], seed=0)],
        args.image_size)
    val_sets = shortcuts.counterfactuals(val_images, references)
    rows = [row for backbone in args.backbones for recipe in RECIPES
            for row in recipe_rows(backbone, recipe, args, paths, labels, val_sets)]
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.groupby(["backbone", "recipe"]).mean(numeric_only=True).drop(columns="seed").round(4).to_string())


if __name__ == "__main__":
    main()
