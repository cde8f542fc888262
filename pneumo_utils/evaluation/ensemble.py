"""Save several trained models of one task as one ensemble model, with its own decision rule.

::

    pneumo ensemble --out ENSEMBLE.keras MEMBER.keras MEMBER.keras ... \\
        [--data DIR --rule youden] [--image-size N]

Each member is loaded with its sidecar (:func:`pneumo_utils.model.saving.load_model`: its
fingerprint, input and output checked); members whose sidecars name different tasks, classes
or outputs are refused, naming both (averaging P(pneumonia) with P(viral) means nothing). The
ensemble (:func:`pneumo_utils.model.ensemble.average`) takes ``--image-size`` (default: the
largest member's) and is saved with a sidecar of the members' task and class names.

A binary ensemble's threshold is its own: the members' thresholds were chosen for their own
outputs, and their mean is not a rule for the mean of their outputs. With ``--data`` (a labelled
``{NORMAL,PNEUMONIA}`` folder, as ``calibrate`` reads, of at least
:data:`~pneumo_utils.evaluation.calibrate.MIN_IMAGES_PER_CLASS` distinct images per class) the
threshold is chosen there by ``--rule``; without it the threshold is 0.5 and the sidecar and a
warning say that it was not chosen. A three-class ensemble decides by argmax. The members'
input checks and uncertain bands describe the members, not the ensemble, and are not carried.
Exit status: 0 written, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pneumo_utils.cli import fail
from pneumo_utils.evaluation.metrics import choose_threshold, describe_rule
from pneumo_utils.files import file_digest
from pneumo_utils.sidecar import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ModelFileError, class_names_of

UNSET_RULE = ("default 0.5, not chosen for this ensemble (no --data): the members' thresholds do "
              "not apply to the mean of their outputs; choose one with python -m "
              "pneumo calibrate on labelled images")
"""``threshold_rule`` of a binary ensemble saved without labelled images."""


def combine(
    member_paths: list[str | Path],
    out: str | Path,
    data: str | Path | None = None,
    rule: str = "youden",
    image_size: int | None = None,
    batch_size: int = 32,
) -> dict:
    """Save the ensemble of the saved models ``member_paths`` to ``out`` (``.keras`` + sidecar)
    and return its sidecar metadata.

    ``data`` (a labelled folder) sets a binary ensemble's threshold by ``rule``; without it the
    threshold is 0.5, recorded as not chosen (:data:`UNSET_RULE`). Raises ``ValueError`` or
    :class:`~pneumo_utils.sidecar.ModelFileError` naming the member or folder at fault.
    """
    from pneumo_utils.data.tasks import get_task
    from pneumo_utils.model.ensemble import average
    from pneumo_utils.model.saving import load_model, model_metadata, save_model

    paths, out = [Path(p) for p in member_paths], Path(out)
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least two member models, got {len(paths)}")
    if out.suffix != ".keras":
        raise ValueError(f"--out {out} must name a .keras file")
    if any(out.resolve() == p.resolve() for p in paths):
        raise ValueError(f"--out {out} is one of the members; name a new file")
    loaded = [load_model(p) for p in paths]
    kinds = [_kind(meta) for _, meta in loaded]
    for path, kind in zip(paths[1:], kinds[1:], strict=True):
        if kind != kinds[0]:
            raise ValueError(
                f"{path} is a {_describe(kind)} model but {paths[0]} is a {_describe(kinds[0])} "
                "model: an ensemble averages one probability, so its members must share task, "
                "classes and output; combine models of one task"
            )
    sizes = [int(meta["image_size"]) for _, meta in loaded]
    size = int(image_size) if image_size is not None else max(sizes)
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {size}")
    for i, ((member, _), path) in enumerate(zip(loaded, paths, strict=True)):
        member.name = f"member{i}_{_layer_name(path.stem)}"  # layer names in the ensemble differ
    model = average([member for member, _ in loaded], image_size=size,
                    name=_layer_name(out.stem), sizes=sizes)
    task, names, output = kinds[0]
    info: dict = {"backbone": "ensemble (mean of the members' probabilities)",
                  "members": [{"file": str(p), "sha256": file_digest(p), "image_size": s,
                               **({"threshold": m["threshold"]} if "threshold" in m else {})}
                              for p, (_, m), s in zip(paths, loaded, sizes, strict=True)],
                  "class_names": list(names)}
    if output == "sigmoid":
        if data is None:
            info.update(threshold=0.5, threshold_rule=UNSET_RULE)
        else:
            info.update(_chosen_threshold(model, data, rule, get_task(task or "pneumonia"),
                                          batch_size))
    meta = model_metadata(model, task=task, **info)
    save_model(model, out, meta)
    return meta


def against_members(
    labels: np.ndarray,
    members: dict[str, np.ndarray],
    ensemble: np.ndarray,
) -> tuple[pd.DataFrame, bool]:
    """AUC of each member and of the ensemble on the same labelled images, and whether the
    ensemble ranks them better than its best member.

    Why: a mean of a strong model and weaker ones can rank a new site's images worse than the
    strong model alone (``RESULTS.md``), so an ensemble is kept only when it beats every member
    on images none of them was fitted on. ``labels``: ``(n,)`` class indices; ``members``: each
    member's probabilities, ``(n,)`` for a sigmoid or ``(n, K)`` for a softmax; ``ensemble``:
    the ensemble's, same shape. Macro one-vs-rest AUC for more than two classes. Returns a
    table (rows: members, then ``"ensemble"``; column ``auc``) and the verdict.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble has at least two members, got {len(members)}")

    def auc(proba: np.ndarray) -> float:
        proba = np.asarray(proba)
        if proba.ndim == 2 and proba.shape[1] > 1:
            return float(roc_auc_score(labels, proba, multi_class="ovr", average="macro"))
        return float(roc_auc_score(labels, proba.reshape(-1)))

    table = pd.DataFrame({"auc": {name: auc(p) for name, p in members.items()} | {"ensemble": auc(ensemble)}})
    best_member = table["auc"].drop("ensemble").max()
    return table, bool(table.loc["ensemble", "auc"] > best_member)


def _chosen_threshold(model, data: str | Path, rule: str, task, batch_size: int) -> dict:
    """The ensemble's threshold by ``rule`` on the labelled images of ``data`` (copies left
    out and at least :data:`~pneumo_utils.evaluation.calibrate.MIN_IMAGES_PER_CLASS` per class,
    as ``calibrate`` reads them), with the rule and data that chose it."""
    from pneumo_utils.evaluation.calibrate import check_counts, distinct_images
    from pneumo_utils.evaluation.evaluate import folder_index
    from pneumo_utils.model.inference import predict_paths

    index, copies = distinct_images(folder_index(str(data), task), data, task.class_names)
    labels = index["label"].to_numpy()
    check_counts({name: int((labels == k).sum()) for k, name in enumerate(task.class_names)},
                 data, "")
    proba = predict_paths(model, index["path"].tolist(), batch_size)
    on = f"{len(labels)} labelled images of {Path(data).name} (ensemble's own outputs)"
    return {"threshold": choose_threshold(labels, np.asarray(proba).reshape(-1), rule),
            "threshold_rule": describe_rule(rule, on=on),
            "threshold_data": {"data": str(Path(data).resolve()), "n_images": int(len(labels)),
                               "copies_left_out": copies}}


def _kind(meta: dict) -> tuple[str | None, tuple[str, ...], str]:
    """What a member's output means: task, class names, output."""
    return meta.get("task"), class_names_of(meta), meta.get("output", "sigmoid")


def _describe(kind: tuple) -> str:
    task, names, output = kind
    return f"{task or 'no-task'} ({', '.join(names)}; {output})"


def _layer_name(stem: str) -> str:
    """``stem`` as a Keras layer name (letters, digits, ``_``)."""
    return "".join(c if c.isalnum() else "_" for c in stem) or "model"


def main(argv: list[str] | None = None) -> int:
    """Save an ensemble of saved models; 0 written, 2 bad input."""
    parser = argparse.ArgumentParser(
        prog="pneumo ensemble",
        description="Save saved models of one task as one ensemble model (the mean of their "
        "probabilities) with its own sidecar; research use only.",
    )
    parser.add_argument("members", nargs="+", metavar="MEMBER.keras", help="saved models of one task")
    parser.add_argument("--out", required=True, help="the ensemble to write (a new .keras path)")
    parser.add_argument("--data", help="labelled folder (NORMAL/ and PNEUMONIA/) to choose a binary "
                        "ensemble's threshold on; without it the threshold is 0.5, not chosen")
    parser.add_argument("--rule", default="youden",
                        help="threshold rule with --data: youden (default), f1, sensitivity:0.95 or fixed:T")
    parser.add_argument("--image-size", type=int, help="the ensemble's input side (default: the largest member's)")
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).is_dir():
        return fail(f"--data {args.data} is not a folder")
    try:
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), args.rule)  # an unknown rule fails before loading
        meta = combine(args.members, args.out, data=args.data, rule=args.rule,
                       image_size=args.image_size)
    except (FileNotFoundError, ModelFileError, ValueError, OSError) as exc:
        return fail(exc)
    rule = (f"threshold {meta['threshold']:.4f} ({meta['threshold_rule']})" if "threshold" in meta
            else "argmax")
    print(f"{args.out}: ensemble of {len(args.members)} {meta.get('task', 'binary')} models, "
          f"{meta['image_size']} px, {rule}")
    if meta.get("threshold_rule") == UNSET_RULE:
        print("warning: threshold 0.5 was not chosen for this ensemble; give --data to choose it on "
              "labelled images", file=sys.stderr)
    return 0
