"""Prediction from the command line, for one image, several, or a folder.

``pneumo predict IMAGE --model MODEL.keras [--gradcam OUT.png]`` prints e.g.
``Prediction: PNEUMONIA (96.40% confidence)`` with the class names stored beside the model: a
binary task's model decides with its stored threshold, a three-class model by the most
probable class (``Prediction: VIRAL PNEUMONIA (71.20% confidence)``); ``--gradcam`` explains
the predicted class. ``--model`` may also name a ``.tflite`` or ``.onnx`` export
(:mod:`pneumo_utils.deploy.export`), which runs without TensorFlow. Several files or a folder print
one line per image (``--json``: one JSON list), with the model loaded once. Warnings about the input (EXIF rotation applied, a nearly uniform,
noise-like or colour picture) are printed under the prediction and carried in the JSON.
An unreadable, damaged or too small image named on the command line, or an unusable model,
exits with status 2 and one line per problem; unreadable files inside a folder are listed as
skipped. Research use only; not for diagnostic use.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from pneumo_utils.cli import fail

GRADCAM_SUFFIXES = (".png", ".jpg", ".jpeg")


NOT_ASSESSED_STATUS = 3
"""Exit status of ``predict`` when an image was beyond the input check's limit (no class given)."""


def predict_image(model, meta: dict, path: str | Path, input_check_on: bool = True) -> dict:
    """Label, confidence, probabilities and input warnings for one image file.

    The label names come from the sidecar's class names (:func:`pneumo_utils.sidecar.class_names_of`).
    A binary model's class follows its raw output against the stored threshold; the result
    has ``probability`` (P(``positive_class``), the second name), ``threshold`` and
    ``probabilities`` {class: p}. A softmax model's class is the most probable one (argmax);
    the result has ``probabilities`` {class: p}. ``decision`` says which; ``confidence`` is
    the probability of the predicted class, using the validation-fitted temperature when
    the sidecar has one, so it reads as a probability. ``raw_output`` is the model's own
    output (a number, or one per class). The image is resized to ``meta["image_size"]`` whatever its own size (huge JPEGs are
    decoded at reduced scale, see :mod:`pneumo_utils.data.images`), turned upright by its EXIF
    orientation (``exif_orientation`` in the result) and checked for being plausible
    (``warnings``). Raises :class:`~pneumo_utils.data.images.ImageReadError` for an unreadable,
    damaged or too small image and :class:`~pneumo_utils.sidecar.ModelFileError` for
    ``meta`` that fails validation or disagrees with the model's input size.

    ``answer`` is what to tell a reader: ``"class"`` (the label stands), ``"uncertain"`` (the
    output lies in the sidecar's abstention band, :mod:`pneumo_utils.evaluation.selective`:
    refer to a reader) or ``"not assessed"`` (the image is beyond the input check's limit,
    :mod:`pneumo_utils.model.input_check`: it does not look like the training images, and no
    label should be read). ``input_check`` has the ``score`` and ``limit`` of the view furthest
    beyond (or closest to) its limit (or ``available: false`` and why; ``partial`` for an
    export, which applies only the thumbnail view); with ``input_check_on=False`` the scores
    are still computed but the answer is given anyway and marked ``overridden``.
    """
    return predict_images(model, meta, [path], errors="raise", input_check_on=input_check_on)[0]


def predict_images(
    model,
    meta: dict,
    paths: list[str | Path],
    batch_size: int = 32,
    verbose: bool = False,
    errors: str = "record",
    input_check_on: bool = True,
) -> list[dict]:
    """:func:`predict_image` for many files, batched, in order.

    With ``errors="record"`` an image that cannot be used gives ``{"image", "error"}``
    instead of a prediction; ``"raise"`` raises instead. ``verbose`` shows a progress bar
    over the batches (``tqdm``).
    """
    from pneumo_utils.data.images import ImageReadError
    from pneumo_utils.model import input_check
    from pneumo_utils.model.inference import batch_size_for
    from pneumo_utils.sidecar import (
        ModelFileError,
        check_output,
        check_probabilities,
        validate_metadata,
    )

    with warnings.catch_warnings():  # a kernel without ipywidgets: text bar, no warning
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    validate_metadata(meta)
    size, expected = int(meta["image_size"]), model.input_shape[1]
    if expected is not None and int(expected) != size:
        raise ModelFileError(
            f"metadata image_size {size} does not match the model's {expected} px input"
        )
    batch_size = batch_size_for(size, batch_size)
    check, both, unavailable = _input_check_for(model, meta)
    results: list[dict] = []
    starts = range(0, len(paths), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not verbose, leave=False):
        batch, ready = [], []
        for path in paths[start: start + batch_size]:
            try:
                image, notes = _prepare(path, size)
            except (ImageReadError, FileNotFoundError) as exc:
                if errors == "raise":
                    raise
                results.append({"image": str(path), "error": " ".join(str(exc).split())})
                continue
            batch.append(image)
            ready.append((len(results), notes))
            results.append({})
        if not batch:
            continue
        images = np.stack(batch).astype(np.float32)
        if both is not None:
            raw, features, small = (np.asarray(a) for a in both.predict(images, verbose=0))
            looks = input_check.Looks(features, small)
        else:
            raw = np.asarray(model.predict(images, verbose=0))
            looks = input_check.Looks(None, input_check.thumbnails(images)) if check is not None else None
        check_output(meta, raw.shape[-1], "the model", "its metadata")
        raw = check_probabilities(raw, getattr(model, "path", "the model"))
        screened = check.describe(looks) if looks is not None else [None] * len(raw)
        for (slot, notes), image, value, seen in zip(ready, images, raw, screened, strict=True):
            described = _describe(value, meta)
            if seen is None:
                screening = {"available": False, "reason": unavailable}
            else:
                screening = dict(seen)
                if unavailable:
                    screening["partial"] = unavailable
                if seen["beyond_limit"] and not input_check_on:
                    screening["overridden"] = True
            if screening.get("beyond_limit") and input_check_on:
                described["answer"] = "not assessed"
            results[slot] = {**described, "input_check": screening, **notes, "image_array": image}
    return results


def _input_check_for(model, meta: dict):
    """The sidecar's input check, the Keras model giving outputs, features and thumbnails
    together (``None`` for an export: only the thumbnail view applies), and what is missing
    (``None`` when the whole check applies)."""
    from pneumo_utils.model import input_check
    from pneumo_utils.sidecar import ModelFileError

    check = input_check.of(meta)
    if check is None:
        return None, None, "the model was saved without an input check; it answers any image"
    if not hasattr(model, "get_layer"):
        return check, None, ("an export carries only the thumbnail view of the input check; the "
                             "feature view needs the .keras model")
    both = input_check.feature_model(model)
    if both is None:
        raise ModelFileError(f"the sidecar has an input check but the model has no layer "
                             f"{input_check.FEATURE_LAYER}: the sidecar belongs to another model")
    width = int(both.outputs[1].shape[-1])
    if width != check.feature_width:
        raise ModelFileError(f"the sidecar's input check describes {check.feature_width} features but the "
                             f"model pools {width}: the sidecar belongs to another model")
    return check, both, None


def _prepare(path: str | Path, size: int) -> tuple[np.ndarray, dict]:
    """The model input for ``path`` and what to say about it (raises if it is unusable)."""
    from pneumo_utils.data.images import (
        MIN_SIDE,
        ImageReadError,
        image_warnings,
        read_header,
        read_resized,
    )

    header = read_header(path)
    if min(header.width, header.height) < MIN_SIDE:
        raise ImageReadError(
            path, f"image too small ({header.width} x {header.height} px; at least {MIN_SIDE} px "
            "on each side is needed)"
        )
    image = read_resized(path, size)
    notes = {
        "image": str(path),
        "exif_orientation": header.orientation,
        "warnings": image_warnings(image),
    }
    return image, notes


def _describe(raw: np.ndarray, meta: dict) -> dict:
    """Label, probabilities and confidence for one image's model output ``raw`` ``(units,)``."""
    from pneumo_utils.evaluation.selective import uncertain
    from pneumo_utils.probability import apply_softmax_temperature, apply_temperature
    from pneumo_utils.sidecar import class_names_of

    names = class_names_of(meta)
    band = meta.get("uncertain")
    if len(raw) > 1:
        proba = np.asarray(raw, dtype=float)
        if "temperature" in meta:
            proba = apply_softmax_temperature(proba[None], meta["temperature"])[0]
        label = int(np.argmax(raw))
        return {
            "answer": "uncertain" if uncertain(band, np.asarray(raw, dtype=float)[None])[0] else "class",
            "raw_output": [float(v) for v in raw],
            "decision": "argmax",
            "label": names[label],
            "confidence": float(proba[label]),
            "probabilities": {name: float(v) for name, v in zip(names, proba, strict=True)},
        }
    value = float(raw[0])
    threshold = float(meta.get("threshold", 0.5))
    label = int(value >= threshold)
    proba = value
    if "temperature" in meta:
        proba = float(apply_temperature(np.array([value]), meta["temperature"])[0])
    return {
        "answer": "uncertain" if uncertain(band, np.array([value]), threshold)[0] else "class",
        "raw_output": value,
        "decision": "threshold",
        "label": names[label],
        "confidence": proba if label else 1.0 - proba,
        "probability": proba,
        "positive_class": names[1],
        "threshold": threshold,
        "probabilities": {names[0]: 1.0 - proba, names[1]: proba},
    }


def _inputs(arguments: list[str]) -> tuple[list[tuple[str, bool]], list[str]]:
    """Image paths from the command line, each with whether it was named explicitly
    (folders expand to their image files, recursively, sorted), and errors for arguments
    that give nothing to predict."""
    from pneumo_utils.data.images import is_image_file

    found, errors = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not files:
                errors.append(f"folder {path} holds no .jpeg/.jpg/.png/.dcm image")
            found += [(f, False) for f in files]
        elif not path.exists() and not path.is_symlink():
            errors.append(f"image file {path} does not exist")
        else:
            found.append((argument, True))
    return found, errors


def _gradcam_target_problem(target: str) -> str | None:
    """Why Grad-CAM could not be written to ``target`` (``None`` if it can): checked before
    anything is predicted, by creating and removing a file in its folder."""
    path = Path(target)
    if path.is_dir():
        return f"--gradcam {path} is a folder; name an image file such as {path / 'gradcam.png'}"
    if path.suffix.lower() not in GRADCAM_SUFFIXES:
        return f"--gradcam {path} must end in .png, .jpg or .jpeg (the image format to write)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"cannot write --gradcam {path}: folder {path.parent}: {exc.strerror or exc}"
    return None


def _write_gradcam(model, result: dict, target: str) -> None:
    """Write the Grad-CAM overlay of ``result`` to ``target`` (raises ``OSError``)."""
    import cv2

    from pneumo_utils.explain.gradcam import grad_cam, overlay
    from pneumo_utils.files import write_bytes_atomic

    heat = grad_cam(model, result["image_array"][None], threshold=result.get("threshold"))[0]
    picture = overlay(result["image_array"], heat)
    ok, encoded = cv2.imencode(Path(target).suffix.lower(), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode the overlay as {Path(target).suffix}")
    write_bytes_atomic(target, encoded.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumo predict",
        description="Predict the class of chest X-rays with a saved pneumo model, named by its "
        "sidecar's classes (research use only).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="JPEG, PNG or DICOM files, or folders of them")
    parser.add_argument(
        "--model", required=True, help="MODEL.keras, or an export MODEL.tflite / MODEL.onnx "
        "(run without TensorFlow); its MODEL.json sidecar is read too"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list, one object per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    parser.add_argument("--gradcam", metavar="OUT.png",
                        help="also write a Grad-CAM overlay of the predicted class here (one image only)")
    parser.add_argument("--no-input-check", action="store_true",
                        help="answer even for images beyond the input check's limit (the answer is "
                        "labelled as such)")
    args = parser.parse_args(argv)

    from pneumo_utils.data.image_checks import check_image
    from pneumo_utils.model.inference import is_exported, load_any

    if args.batch_size < 1:
        return fail(f"--batch-size must be a positive integer, got {args.batch_size}")
    inputs, problems = _inputs(args.images)
    if args.gradcam:
        if is_exported(args.model):
            return fail(f"--gradcam needs the .keras model (Grad-CAM reads the model's "
                         f"gradients); {args.model} is an export")
        if len(inputs) != 1 or problems:
            return fail("--gradcam takes exactly one image")
        problem = _gradcam_target_problem(args.gradcam)
        if problem:
            return fail(problem)
    failed = bool(problems)
    for problem in problems:
        fail(problem)
    readable, skipped = [], []
    for path, explicit in inputs:  # a bad image fails fast, before TensorFlow loads
        reason = check_image(path)
        if reason is None:
            readable.append(path)
        elif explicit:
            failed = True
            fail(f"cannot read {path}: {reason}")
        else:
            skipped.append({"image": path, "error": f"skipped: {reason}"})
            print(f"skipped {path}: {reason}", file=sys.stderr)
    if not readable:
        return 2

    from pneumo_utils.data.images import ImageReadError
    from pneumo_utils.sidecar import ModelFileError

    try:
        model, meta = load_any(args.model)
        results = predict_images(model, meta, readable, batch_size=args.batch_size,
                                 verbose=len(readable) > args.batch_size and sys.stderr.isatty(),
                                 errors="raise" if len(inputs) == 1 else "record",
                                 input_check_on=not args.no_input_check)
    except (ImageReadError, ModelFileError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    failed = failed or any("error" in r for r in results)
    if args.json:
        hidden = {"image_array"}
        shown = [{k: v for k, v in r.items()
                  if k not in hidden | ({"label", "confidence"} if r.get("answer") == "not assessed" else set())}
                 for r in results + skipped]
        print(json.dumps(shown, indent=2))
    elif len(inputs) == 1:
        _print_single(results[0], meta)
    else:
        _print_many(results, meta)
    if args.gradcam and results[0].get("answer") != "not assessed":
        try:
            _write_gradcam(model, results[0], args.gradcam)
        except OSError as exc:
            return fail(f"cannot write Grad-CAM overlay {args.gradcam}: {exc}")
        if not args.json:
            print(f"Grad-CAM overlay written to {args.gradcam}")
    if failed:
        return 2
    return NOT_ASSESSED_STATUS if any(r.get("answer") == "not assessed" for r in results) else 0


def _answer(result: dict) -> str:
    """The first line's answer: the class, UNCERTAIN, or Not assessed."""
    screening = result.get("input_check", {})
    if result.get("answer") == "not assessed":
        return ("Not assessed: this image does not look like the chest X-rays the model was "
                f"trained on (score {screening['score']:.2f}, limit {screening['limit']:.2f}, "
                f"{_VIEW_NAMES[screening['view']]})")
    if result.get("answer") == "uncertain":
        return f"UNCERTAIN: refer to a reader ({_probabilities(result)})"
    return f"{result['label']} ({result['confidence']:.2%} confidence)"


_VIEW_NAMES = {"features": "the model's features", "thumbnail": "the image's grey layout"}


def _print_single(result: dict, meta: dict) -> None:
    if result.get("answer") == "not assessed":
        print(_answer(result))
        print("No class is given; --no-input-check forces an answer. Not for diagnostic use.")
    else:
        print(f"Prediction: {_answer(result)}")
        print(f"{_probabilities(result)}; {_decision(meta)}. Not for diagnostic use.")
    _print_notes(result, indent="")


def _print_many(results: list[dict], meta: dict) -> None:
    for result in results:
        if "error" in result:
            fail(result["error"])
            continue
        shown = _answer(result)
        if result.get("answer") == "class":
            shown = shown[:-1] + f", {_probabilities(result)})"
        print(f"{result['image']}: {shown}")
        _print_notes(result, indent="  ")
    print(f"Decision: {_decision(meta)}. Not for diagnostic use.")


def _probabilities(result: dict) -> str:
    """``P(PNEUMONIA) = 0.9640`` for a binary model, every class's probability for more."""
    if result["decision"] == "threshold":
        return f"P({result['positive_class']}) = {result['probability']:.4f}"
    return ", ".join(f"P({name}) = {p:.4f}" for name, p in result["probabilities"].items())


def _decision(meta: dict) -> str:
    """How the class was chosen, for the line under the prediction."""
    from pneumo_utils.sidecar import class_names_of

    band = meta.get("uncertain") or {}
    refer = ""
    if band.get("min_margin"):
        shown = (f"P between {band['low']:.4f} and {band['high']:.4f}" if "low" in band
                 else f"top probability below {band['min_margin']:.4f}")
        refer = (f"; uncertain (refer to a reader) when {shown}, a band chosen on "
                 f"{band.get('chosen_on', '?')} for {band.get('target_accuracy', 0):.0%} accurate decisions")
    if len(class_names_of(meta)) == 2:
        threshold = float(meta.get("threshold", 0.5))
        return f"threshold {threshold:.4f} ({meta.get('threshold_rule', 'default')}){refer}"
    return f"the most probable class (argmax, no threshold){refer}"


def _print_notes(result: dict, indent: str) -> None:
    screening = result.get("input_check", {})
    if screening.get("overridden"):
        print(f"{indent}input check OVERRIDDEN (--no-input-check): score {screening['score']:.2f} is "
              f"beyond the limit {screening['limit']:.2f} ({_VIEW_NAMES[screening['view']]}); this image "
              "does not look like the training "
              "images and the answer above may mean nothing")
    elif screening.get("available") is False:
        print(f"{indent}note: no input check: {screening['reason']}")
    elif screening.get("partial"):
        print(f"{indent}note: {screening['partial']}")
    if result["exif_orientation"] != 1:
        print(f"{indent}note: EXIF orientation {result['exif_orientation']} applied "
              "(the image was turned upright before scoring)")
    for warning in result["warnings"]:
        print(f"{indent}warning: {warning}")


if __name__ == "__main__":
    sys.exit(main())
