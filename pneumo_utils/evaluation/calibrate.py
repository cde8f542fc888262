"""Calibrate a saved model to a new site: threshold and temperature from its labelled images.

A model's threshold is chosen on validation images from its training collection. At another
hospital the same threshold can call half the healthy children "pneumonia": exposure,
processing and population move the scores. A small labelled sample of the site's own images
fixes the operating point without touching the weights::

    pneumo calibrate --model saved_models/M.keras --data SITE_DIR \\
        --out saved_models/M.site.keras [--rule youden] [--n-boot 1000] [--json]

``SITE_DIR`` holds ``NORMAL/`` and ``PNEUMONIA/`` (a Kermany-layout folder; the subtype tasks
read bacteria/virus from file names). The output is a byte copy of the ``.keras`` file (the
weights are unchanged) with a sidecar whose ``threshold`` is chosen by ``--rule`` on the site's
images and whose ``temperature`` is fitted on them; its ``calibration`` field records the rule,
the folder, the images per class, the figures before and after with 95% patient-level
bootstrap intervals (a proportion's interval covers at least its exact binomial one), and a
warning when a class has fewer than ``--min-per-class`` images (the intervals say how little
such a sample pins down). A three-class model decides by argmax and gets only a temperature.
The model card beside the copy says all of this.

What cannot give a trustworthy operating point is refused: the same file content under two
classes, fewer than :data:`MIN_IMAGES_PER_CLASS` distinct images of a class (copies within a
class count once and are left out), and a temperature fitted at the edge of the range searched
(the site's scores then separate the classes perfectly or not at all, and any temperature the
search returns is an artefact: 0.05 turns every answer into "100%"), as is a threshold chosen
at 0 or 1 (outputs that saturate).

The figures after calibration are measured on the images the threshold was chosen on, so they
are optimistic; score the calibrated model on other images of the site before relying on it.
Exit status: 0 done, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from pneumo_utils.cli import fail
from pneumo_utils.evaluation.evaluate import folder_index
from pneumo_utils.evaluation.metrics import (
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    describe_rule,
    fit_softmax_temperature,
    fit_temperature,
    multiclass_bootstrap_ci,
    multiclass_metrics,
)
from pneumo_utils.evaluation.selective import DEFAULT_TARGET_ACCURACY, MIN_IMAGES, choose_band
from pneumo_utils.evaluation.site_shift import site_report
from pneumo_utils.files import atomic_path, file_digest, write_json_atomic, write_text_atomic
from pneumo_utils.sidecar import MAX_TEMPERATURE, MIN_TEMPERATURE, ModelFileError, signed

MIN_PER_CLASS = 50
"""Below this many images of a class, the calibration says its figures are uncertain."""
MIN_IMAGES_PER_CLASS = 10
"""Fewest distinct images of each class calibration accepts: with fewer, a threshold and a
temperature are fitted to a handful of points (1 image per class fits temperature 0.05)."""
TEMPERATURE_EDGE = 0.01
"""Relative distance from a search bound (:data:`~pneumo_utils.sidecar.MIN_TEMPERATURE`,
:data:`~pneumo_utils.sidecar.MAX_TEMPERATURE`) within which a fitted temperature is refused."""
SHOWN = ("auc", "accuracy", "sensitivity", "specificity")


def calibrate(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    rule: str = "youden",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    min_per_class: int = MIN_PER_CLASS,
    target_accuracy: float | None = DEFAULT_TARGET_ACCURACY,
) -> dict:
    """Write a site-calibrated copy of ``model_path`` to ``out`` (``.keras`` + sidecar + card).

    When the model has an input check (:mod:`pneumo_utils.model.input_check`), the site's
    images beyond its limit are counted apart (``input_check``), the rule and temperature are
    fitted on the accepted ones, and the record holds the site-shift test of the site's
    images (``site_shift``, :func:`pneumo_utils.evaluation.site_shift.site_report`). With a
    ``target_accuracy``, the copy's abstention band (``uncertain``) is chosen on the site's
    images for confident decisions that accurate
    (:func:`pneumo_utils.evaluation.selective.choose_band`; ``None`` keeps the model's own).

    Returns the ``calibration`` record written into the new sidecar. Raises
    ``FileNotFoundError``/``ValueError``/:class:`~pneumo_utils.sidecar.ModelFileError` with a
    message that names the problem.
    """
    from pneumo_utils.data.tasks import task_of
    from pneumo_utils.model import input_check
    from pneumo_utils.model.inference import predict_paths
    from pneumo_utils.model.saving import load_model, sidecar_path

    model_path, out = Path(model_path), Path(out)
    if model_path.suffix != ".keras":
        raise ValueError(f"{model_path} is not a .keras model; calibrate the .keras file, then export "
                         "the calibrated copy (pneumo export)")
    if out.suffix != ".keras":
        raise ValueError(f"--out {out} must name a .keras file")
    if out.resolve() == model_path.resolve():
        raise ValueError(f"--out {out} is the model itself; name a new file so the original is kept")
    if out.stem == "best" or out.stem.startswith("best."):
        raise ValueError(f"--out {out} would overwrite the runner's pointer {out.with_suffix('.json').name}; "
                         "name the copy after the model, e.g. MODEL.site.keras")
    model, meta = load_model(model_path)
    task = task_of(meta)
    index, copies = distinct_images(folder_index(str(data), task), data, task.class_names)
    labels = index["label"].to_numpy()
    counts = {name: int((labels == k).sum()) for k, name in enumerate(task.class_names)}
    check_counts(counts, data, "")
    groups = index["patient"].to_numpy()
    check = input_check.of(meta, f"sidecar of {model_path}")
    screening: dict = {}
    if check is None:
        proba = predict_paths(model, index["path"].tolist(), batch_size, verbose=sys.stderr.isatty())
    else:
        proba, looks = input_check.predict_with_looks(model, index["path"].tolist(), batch_size)
        beyond = check.flagged(looks)
        screening = {"input_check": {"limits": check.limits, "beyond_limit": int(beyond.sum()),
                                     "share_beyond_limit": float(beyond.mean()),
                                     "files_beyond_limit": index["path"][beyond].tolist()},
                     "site_shift": site_report(check, looks, data=str(Path(data).resolve()), seed=seed)}
        labels, proba, groups = labels[~beyond], proba[~beyond], groups[~beyond]
        check_counts({name: int((labels == k).sum()) for k, name in enumerate(task.class_names)},
                      data, " within the model's input check (images beyond it are not like the "
                      "training ones)")
    record: dict = {"data": str(Path(data).resolve()), "counts": counts, "n_images": int(len(labels)),
                    "copies_left_out": copies,
                    "ci_method": f"{n_boot} bootstrap resamples of patients, stratified by class",
                    **screening}
    new = dict(meta)
    if task.binary:
        before = float(meta.get("threshold", 0.5))
        threshold = choose_threshold(labels, proba, rule)
        if not rule.startswith("fixed") and not 0 < threshold < 1:
            raise ValueError(
                f"rule {rule} puts the threshold at {threshold:g} on the {len(labels)} images of "
                f"{data}: the model's outputs on them saturate at 0 or 1, so no threshold between "
                "them is supported; calibrate on more images of the site, or give --rule fixed:T"
            )
        temperature = fit_temperature(labels, proba)
        on = f"{len(labels)} labelled images of the site ({Path(data).name})"
        record.update(rule=describe_rule(rule, on=on), threshold_before=before, threshold=threshold,
                      before=_binary_figures(labels, proba, before, n_boot, seed, groups),
                      after=_binary_figures(labels, proba, threshold, n_boot, seed, groups))
        new.update(threshold=threshold, threshold_rule=f"{describe_rule(rule, on=on)} (site calibration)")
    else:
        temperature = fit_softmax_temperature(labels, proba)
        figures = multiclass_metrics(labels, proba, task.class_names)
        cis = multiclass_bootstrap_ci(labels, proba, n_boot=n_boot, seed=seed, groups=groups)
        record.update(rule="argmax (no threshold); softmax temperature only",
                      after={m: figures[m] for m in ("auc", "accuracy", "balanced_accuracy", "macro_f1")}
                      | {f"{m}_ci": list(cis[m]) for m in ("auc", "accuracy", "balanced_accuracy")})
    flat = _check_temperature(temperature, data, len(labels))
    record["temperature"] = temperature
    if target_accuracy is not None and len(labels) >= MIN_IMAGES:
        band = choose_band(labels, proba, new.get("threshold") if task.binary else None,
                           target_accuracy=target_accuracy,
                           chosen_on=f"{len(labels)} labelled images of the site ({Path(data).name}; in-sample)")
        record["uncertain"] = band
        new["uncertain"] = band
    small = {name: n for name, n in counts.items() if n < min_per_class}
    if small:
        widths = {m: ci[1] - ci[0] for m, ci in ((m, record["after"].get(f"{m}_ci")) for m in
                                                  ("sensitivity", "specificity", "accuracy")) if ci}
        record["warning"] = (
            f"only {', '.join(f'{n} {name}' for name, n in small.items())} image(s) (fewer than "
            f"{min_per_class} per class): the figures are uncertain ("
            + ", ".join(f"{m} CI {w:.2f} wide" for m, w in widths.items()) + ")")
    if flat:
        record["warning"] = "; ".join(filter(None, (record.get("warning"), flat)))
    record["note"] = ("figures after calibration are measured on the images the threshold and "
                      "temperature were fitted on: optimistic; score the copy on other images of the site")
    new.update(temperature=temperature, calibration=record)
    new.pop("exports", None)  # the original's exports are not beside the copy
    _copy_atomic(model_path, out)
    write_json_atomic(sidecar_path(out), signed(new, {"keras": file_digest(out)}))
    card = model_path.with_suffix(".md")
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# Model card: {meta.get('name', out.stem)}\n"
    write_text_atomic(out.with_suffix(".md"), text + _card_section(record, task.binary))
    return record


def distinct_images(index, data: str | Path, class_names) -> tuple:
    """``index`` without the files whose content (SHA-256) an earlier row of the same class
    has, and how many rows were left out; :class:`ValueError` naming two files when one
    content is under two classes (no threshold can separate an image from itself)."""
    digests = index["path"].map(file_digest)
    labels = index["label"].to_numpy()
    first: dict[str, int] = {}
    keep = []
    for row, (digest, label) in enumerate(zip(digests, labels, strict=True)):
        seen = first.setdefault(digest, row)
        if labels[seen] != label:
            raise ValueError(
                f"{data}: {index['path'].iloc[seen]} ({class_names[labels[seen]]}) and "
                f"{index['path'].iloc[row]} ({class_names[label]}) have the same content; each "
                "image of a calibration set needs one label: remove the copies"
            )
        keep.append(seen == row)
    return index[keep].reset_index(drop=True), int(len(index) - sum(keep))


def check_counts(counts: dict[str, int], data: str | Path, where: str) -> None:
    """:class:`ValueError` when a class has fewer than :data:`MIN_IMAGES_PER_CLASS` images."""
    few = {name: n for name, n in counts.items() if n < MIN_IMAGES_PER_CLASS}
    if few:
        raise ValueError(
            f"{data} has only {', '.join(f'{n} {name}' for name, n in few.items())} distinct "
            f"image(s){where}; calibration needs at least {MIN_IMAGES_PER_CLASS} per class "
            f"({MIN_PER_CLASS} or more for figures to rely on): add labelled images of the site"
        )


def _check_temperature(temperature: float, data: str | Path, n: int) -> str | None:
    """:class:`ValueError` when the fitted temperature lies at the lower bound of the search
    (every prediction would read "100%"); a warning when it lies at the upper bound (the
    model's scores carry almost nothing about these images' classes, so calibrated
    probabilities stay near the base rate, which is honest but worth saying)."""
    if abs(temperature - MIN_TEMPERATURE) <= TEMPERATURE_EDGE * MIN_TEMPERATURE:
        raise ValueError(
            f"the temperature fitted on the {n} images of {data} is {temperature:.3g}, at the "
            f"edge of the range searched ({MIN_TEMPERATURE}-{MAX_TEMPERATURE:g}): the model's "
            "scores on them separate the classes perfectly, so they do not support any "
            f"temperature; calibrate on more images of the site (at least {MIN_PER_CLASS} per class)"
        )
    if abs(temperature - MAX_TEMPERATURE) <= TEMPERATURE_EDGE * MAX_TEMPERATURE:
        return (f"the temperature fitted on the {n} images is {temperature:.3g}, the largest "
                "searched: the model's scores barely separate this site's classes, so its "
                "calibrated probabilities stay near the base rate")
    return None


def _binary_figures(labels: np.ndarray, proba: np.ndarray, threshold: float, n_boot: int, seed: int,
                    groups: np.ndarray) -> dict:
    """AUC, accuracy, sensitivity and specificity at ``threshold`` with patient-level CIs."""
    figures = binary_metrics(labels, proba, threshold)
    cis = bootstrap_ci(labels, proba, threshold, n_boot=n_boot, seed=seed, groups=groups)
    return {m: figures[m] for m in SHOWN} | {f"{m}_ci": list(cis[m]) for m in SHOWN}


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file and a rename
    (:func:`~pneumo_utils.files.atomic_path`)."""
    with atomic_path(target, suffix=".keras") as tmp:
        shutil.copyfile(source, tmp)


def _card_section(record: dict, binary: bool) -> str:
    """The model card's section on the site calibration."""
    counts = ", ".join(f"{n} {name}" for name, n in record["counts"].items())

    def cell(figures: dict, metric: str) -> str:
        lo, hi = figures.get(f"{metric}_ci", (float("nan"), float("nan")))
        return f"{figures[metric]:.3f} ({lo:.3f} - {hi:.3f})"

    if binary:
        rows = "\n".join(f"| {m} | {cell(record['before'], m)} | {cell(record['after'], m)} |" for m in SHOWN)
        table = (f"| metric | threshold {record['threshold_before']:.4f} (before) | threshold "
                 f"{record['threshold']:.4f} (calibrated) |\n|---|---|---|\n{rows}\n")
    else:
        rows = "\n".join(f"| {m} | {cell(record['after'], m)} |" for m in ("auc", "accuracy", "balanced_accuracy"))
        table = f"| metric | argmax |\n|---|---|\n{rows}\n"
    warning = f"\n**Warning**: {record['warning']}.\n" if record.get("warning") else ""
    screening = ""
    if record.get("input_check"):
        ic, shift = record["input_check"], record["site_shift"]
        screening = (f"\n{ic['beyond_limit']} of the site's images were beyond the input check's limits "
                     "and were left out. Site shift: {shift['verdict']} (MMD "
                     f"permutation p = {shift['p_value']:.3g}).\n")
    band = record.get("uncertain")
    if band and band.get("reachable") and band.get("low") is not None:
        screening += (f"\nUncertain answers (refer to a reader): P between {band['low']:.4f} and "
                      f"{band['high']:.4f}, chosen on the same images for {band['target_accuracy']:.0%} "
                      f"accurate decisions (coverage {band['coverage']:.1%}, in-sample).\n")
    elif band and band.get("reachable") and band.get("min_margin"):
        screening += (f"\nUncertain answers: top probability below {band['min_margin']:.4f}, chosen on the "
                      f"same images (coverage {band['coverage']:.1%}, in-sample).\n")
    return f"""
## Site calibration
The decision rule of this copy was set on labelled images of the site, not on the training
collection's validation split: **{record['rule']}** on `{record['data']}` ({counts}); softmax or
sigmoid temperature {record['temperature']:.2f} fitted on the same images. The weights are those of
the original model. 95% CIs: {record['ci_method']}.

{table}{warning}{screening}
{record['note'][0].upper() + record['note'][1:]}.
"""


def main(argv: list[str] | None = None) -> int:
    """Calibrate a model to a site's labelled images; 0 done, 2 bad input."""
    parser = argparse.ArgumentParser(
        prog="pneumo calibrate",
        description="Write a copy of a saved model whose threshold and temperature are fitted on a "
        "site's labelled images (NORMAL/ and PNEUMONIA/); the weights are not changed.",
    )
    parser.add_argument("--model", required=True, help="MODEL.keras with its JSON sidecar")
    parser.add_argument("--data", required=True, help="the site's labelled folder: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--out", required=True, help="the calibrated copy to write (a new .keras path)")
    parser.add_argument("--rule", default="youden",
                        help="threshold rule: youden (default), f1, sensitivity:0.95 or fixed:T")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS,
                        help="warn below this many images of a class (%(default)s)")
    parser.add_argument("--target-accuracy", type=float, default=DEFAULT_TARGET_ACCURACY,
                        help="choose the uncertain band on the site's images so that the confident "
                        "decisions reach this accuracy (%(default)s); 0 keeps the model's own band")
    parser.add_argument("--json", action="store_true", help="print the calibration record as JSON")
    args = parser.parse_args(argv)
    if args.target_accuracy != 0 and not 0.5 < args.target_accuracy < 1:
        return fail(f"--target-accuracy must be between 0.5 and 1 (exclusive), or 0, got {args.target_accuracy}")
    if args.n_boot < 1:
        return fail(f"--n-boot must be a positive integer, got {args.n_boot}")
    try:
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), args.rule)  # an unknown rule fails here, before the model loads
        record = calibrate(args.model, args.data, args.out, rule=args.rule, n_boot=args.n_boot,
                           min_per_class=args.min_per_class, target_accuracy=args.target_accuracy or None)
    except (FileNotFoundError, ModelFileError, ValueError, OSError) as exc:
        return fail(exc)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"calibrated copy: {args.out} ({record['rule']}; {record['n_images']} images)")
        if "threshold" in record:
            for when, key in (("before", "threshold_before"), ("after", "threshold")):
                f = record[when]
                print(f"  {when}: threshold {record[key]:.4f}, accuracy {f['accuracy']:.3f}, "
                      f"sensitivity {f['sensitivity']:.3f} ({f['sensitivity_ci'][0]:.3f}-{f['sensitivity_ci'][1]:.3f}), "
                      f"specificity {f['specificity']:.3f} ({f['specificity_ci'][0]:.3f}-{f['specificity_ci'][1]:.3f})")
        print(f"  temperature {record['temperature']:.2f}")
        if record.get("input_check"):
            print(f"  input check: {record['input_check']['beyond_limit']} image(s) beyond the limit, left out; "
                  f"site shift: {record['site_shift']['verdict']}")
        band = record.get("uncertain")
        if band and band.get("reachable"):
            print(f"  uncertain band: coverage {band['coverage']:.1%}, confident decisions "
                  f"{band['accuracy_confident']:.3f} accurate (in-sample)")
    if record.get("warning"):
        print(f"warning: {record['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
