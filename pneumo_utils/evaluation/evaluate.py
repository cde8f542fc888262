"""The ``evaluate`` command: a saved model scored on a folder of labelled images.

Command line: ``pneumo evaluate --model MODEL.keras --data DIR [--task T]
[--out F]`` evaluates a saved model on a Kermany-layout folder (``{NORMAL,PNEUMONIA}``, or a
data root's ``test/``; the subtype tasks read bacteria/virus from the file names) for the task
it was trained for (its sidecar's), and prints one JSON object: binary tasks at the threshold
stored beside the model, three classes by argmax. ``--cue-test`` (binary tasks) adds the
shortcut check of :mod:`pneumo_utils.evaluation.shortcuts` (each image with the histogram or the frame of
an image of the other class from the same folder) and its selection score. Files left out
(unreadable or not images) are counted and named in the JSON (``skipped``), and so are images
found in sub-folders of a class folder (``nested_images``), which are scored with that class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pneumo_utils.cli import fail
from pneumo_utils.data.kermany import load_class_folder, load_kermany
from pneumo_utils.data.tasks import TASKS, get_task, task_index, task_of
from pneumo_utils.evaluation.metrics import (
    ARGMAX_RULE,
    binary_metrics,
    bootstrap_ci,
    calibration_summary,
    multiclass_bootstrap_ci,
    multiclass_metrics,
)
from pneumo_utils.probability import apply_softmax_temperature, apply_temperature


def folder_index(data: str, task) -> pd.DataFrame:
    """Index of a ``{NORMAL,PNEUMONIA}`` folder, or of a data root's ``test/`` split (the
    other splits need not exist), with the labels of ``task``: what the ``evaluate`` and
    ``calibrate`` commands read
    (:func:`pneumo_utils.data.tasks.task_index`; ``attrs`` kept)."""
    path = Path(data)
    index = load_kermany(path, splits=("test",)) if (path / "test").is_dir() else load_class_folder(path)
    attrs = index.attrs
    index = task_index(index, task)
    index.attrs = attrs
    return index


def main(argv: list[str] | None = None) -> int:
    """Evaluate a saved model on a folder and print one JSON object."""
    parser = argparse.ArgumentParser(
        prog="pneumo evaluate",
        description="Evaluate a saved pneumo model on a Kermany-layout folder ({NORMAL,PNEUMONIA}; "
        "bacteria/virus read from the file names) for the task it was trained for.",
    )
    parser.add_argument(
        "--model", required=True, help="path to MODEL.keras, or an export MODEL.tflite / "
        "MODEL.onnx (run without TensorFlow); sidecar MODEL.json beside it"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="folder with NORMAL/ and PNEUMONIA/, or a data root with test/",
    )
    parser.add_argument(
        "--task", choices=list(TASKS),
        help="the task to evaluate; default and only choice: the one the model was trained for "
        "(its sidecar's task, pneumonia when it names none)",
    )
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--cue-test",
        action="store_true",
        help="binary tasks: also score the images with the grey-level histogram or the outer frame "
        "of an image of the other class, or a blank frame, at the same threshold, and give the "
        "selection score (pneumo_utils.evaluation.shortcuts)",
    )
    args = parser.parse_args(argv)

    from pneumo_utils.files import write_json_atomic
    from pneumo_utils.model import input_check
    from pneumo_utils.model.inference import is_exported, load_any, predict_paths
    from pneumo_utils.sidecar import ModelFileError, read_sidecar

    for flag, value in (("--batch-size", args.batch_size), ("--n-boot", args.n_boot)):
        if value < 1:
            return fail(f"{flag} must be a positive integer, got {value}")
    if args.out and Path(args.out).is_dir():
        return fail(f"--out {args.out} is a folder; name a .json file to write")
    if args.cue_test and is_exported(args.model):
        return fail(f"--cue-test needs the .keras model; {args.model} is an export")
    try:
        task = task_of(read_sidecar(Path(args.model).with_suffix(".json")))
    except ModelFileError as exc:
        return fail(exc)
    if args.task is not None and args.task != task.name:
        asked = get_task(args.task)
        return fail(
            f"{args.model} was trained for task {task.name} (classes {', '.join(task.class_names)}), "
            f"not {asked.name} ({', '.join(asked.class_names)}); drop --task to evaluate it for "
            f"{task.name}, or evaluate a model trained for {asked.name}"
        )
    if args.cue_test and not task.binary:
        return fail(f"--cue-test checks a threshold between two classes; task {task.name} has "
                     f"{task.n_classes} classes and decides by argmax; drop --cue-test")
    try:
        model, meta = load_any(args.model)
        index = folder_index(args.data, task)
        labels = index["label"].to_numpy()
        _check_every_class(labels, task, args.data)
        check = input_check.of(meta, f"sidecar of {args.model}")
        if check is None or is_exported(args.model):
            proba = predict_paths(model, index["path"].tolist(), args.batch_size,
                                  verbose=sys.stderr.isatty())
            looks = None if check is None else input_check.Looks(
                None, input_check.thumbnails_of(index["path"].tolist(), int(meta["image_size"])))
        else:
            proba, looks = input_check.predict_with_looks(model, index["path"].tolist(), args.batch_size)
    except (FileNotFoundError, ModelFileError, ValueError) as exc:
        return fail(exc)
    if task.binary:
        result = _evaluate_binary(model, meta, index, labels, proba, args)
    else:
        result = multiclass_metrics(labels, proba, task.class_names)
        result["ci"] = multiclass_bootstrap_ci(labels, proba, n_boot=args.n_boot)
        if "temperature" in meta:
            result["calibrated"] = {
                "temperature": meta["temperature"],
                **calibration_summary(labels, apply_softmax_temperature(proba, meta["temperature"])),
            }
        result.update(threshold_rule=ARGMAX_RULE)
    result.update(screening_figures(index, labels, proba, meta, check, looks, task, exported=is_exported(args.model)))
    result.update(
        task=task.name,
        class_names=list(task.class_names),
        decision=task.decision,
        model=str(args.model),
        data=str(args.data),
        skipped={"count": len(index.attrs["skipped"]), "files": index.attrs["skipped"]},
        nested_images=index.attrs["nested"],
    )
    result = strict_json(result)
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if args.out:
        try:
            write_json_atomic(args.out, result)
        except OSError as exc:
            return fail(f"cannot write --out {args.out}: {exc}")
    return 0


def _check_every_class(labels: np.ndarray, task, data: str) -> None:
    """Refuse data without an image of one of ``task``'s classes (``ValueError``): its
    recall, AUC and confusion row would be undefined (NaN, or 0.0 for an absent class)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=task.n_classes)
    empty = [name for name, n in zip(task.class_names, counts, strict=True) if n == 0]
    if empty:
        raise ValueError(
            f"{data} has no images of {', '.join(empty)} for task {task.name}; evaluation needs "
            "labelled images of every class (add them, or evaluate a model of another task)"
        )


def strict_json(value):
    """``value`` with every non-finite float (NaN, infinity) replaced by ``None``, so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON (``null``, never bare ``NaN``)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def screening_figures(index: pd.DataFrame, labels: np.ndarray, proba: np.ndarray, meta: dict, check,
                      looks, task, exported: bool = False) -> dict:
    """What the model's input check and abstention band do on labelled images.

    ``input_check``: the limits, how many images are beyond one (counted apart and named),
    which views were applied (an export applies only the thumbnail view), or why there is no
    check; ``accepted``: the metrics on the images within the limits (the ones ``predict``
    answers); ``selective``: the band's coverage and the accuracy of the confident decisions
    among the accepted images (:func:`pneumo_utils.evaluation.selective.selective_report`,
    without the curve)."""
    from pneumo_utils.evaluation.selective import selective_report

    threshold = float(meta.get("threshold", 0.5)) if task.binary else None
    if check is None:
        screening = {"available": False, "reason": "the model was saved without an input check; every image is scored"}
        accepted = np.ones(len(labels), dtype=bool)
    else:
        beyond = check.flagged(looks)
        accepted = ~beyond
        screening = {"limits": check.limits, "limit_rule": check.limit_rule, "views": list(check.scores(looks)),
                     "beyond_limit": int(beyond.sum()), "share_beyond_limit": float(beyond.mean()),
                     "files_beyond_limit": index["path"][beyond].tolist()}
        if exported:
            screening["partial"] = "an export applies only the thumbnail view; evaluate the .keras model for both"
    result: dict = {"input_check": screening}
    kept_labels, kept_proba = labels[accepted], proba[accepted]
    if check is not None and len(np.unique(kept_labels)) == task.n_classes:
        result["accepted"] = (binary_metrics(kept_labels, kept_proba, threshold) if task.binary
                              else multiclass_metrics(kept_labels, kept_proba, task.class_names))
        result["accepted"]["images"] = int(accepted.sum())
    if meta.get("uncertain") and len(kept_labels):
        selective = selective_report(kept_labels, kept_proba, threshold, meta["uncertain"])
        result["selective"] = {k: v for k, v in selective.items() if k != "risk_coverage"}
    return result


def _evaluate_binary(model, meta: dict, index: pd.DataFrame, labels: np.ndarray,
                     proba: np.ndarray, args: argparse.Namespace) -> dict:
    """The command line's result for a binary task: metrics and CIs at the sidecar's
    threshold, calibration with its temperature, and the cue test when asked for."""
    threshold = float(meta.get("threshold", 0.5))
    result = binary_metrics(labels, proba, threshold)
    result["ci"] = bootstrap_ci(labels, proba, threshold, n_boot=args.n_boot)
    if "temperature" in meta:
        result["calibrated"] = {
            "temperature": meta["temperature"],
            **calibration_summary(labels, apply_temperature(proba, meta["temperature"])),
        }
    if args.cue_test:
        from pneumo_utils.evaluation.shortcuts import (
            SELECTION_RULE,
            selection_score,
            validation_cue_test,
        )

        paths = index["path"].tolist()
        table = validation_cue_test(model, paths, labels, paths, labels, threshold,
                                    max_images=None, batch_size=args.batch_size)
        result["cue_test"] = table.round(4).to_dict(orient="index")
        result["selection_score"] = selection_score(table)
        result["selection_rule"] = SELECTION_RULE
    result["threshold_rule"] = meta.get("threshold_rule", "default 0.5 (no sidecar)")
    return result


if __name__ == "__main__":
    sys.exit(main())
