"""Single-image prediction from the command line.

``python -m pneumo_utils.predict IMAGE --model MODEL.keras [--gradcam OUT.png]`` prints e.g.
``Prediction: PNEUMONIA (96.40% confidence)`` using the decision threshold stored beside the
model. Unreadable images or models exit with status 2 and one line naming the problem.
Research use only; not for diagnostic use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pneumo_utils import CLASS_NAMES


def predict_image(model, meta: dict, path: str | Path) -> dict:
    """Probability, label and confidence for one image file (any supported format or size).

    The class follows the model's raw output against its stored threshold. Confidence is the
    probability of that class (``p`` for PNEUMONIA, ``1 - p`` for NORMAL), using the
    validation-fitted temperature when the sidecar has one, so it reads as a probability.
    The image is resized to ``meta["image_size"]`` whatever its own size (huge JPEGs and
    PNGs are decoded at reduced scale, see :mod:`pneumo_utils.images`); a ``meta`` whose
    ``image_size`` disagrees with the model's input raises
    :class:`~pneumo_utils.models.ModelFileError`.
    """
    from pneumo_utils.evaluate import apply_temperature
    from pneumo_utils.images import read_resized

    size, expected = int(meta["image_size"]), model.inputs[0].shape[1]
    if expected is not None and int(expected) != size:
        from pneumo_utils.models import ModelFileError

        raise ModelFileError(
            f"metadata image_size {size} does not match the model's {expected} px input"
        )
    image = read_resized(str(path), size)[None].astype(np.float32)
    raw = float(model.predict(image, verbose=0).reshape(-1)[0])
    threshold = float(meta.get("threshold", 0.5))
    label = int(raw >= threshold)
    proba = raw
    if "temperature" in meta:
        proba = float(apply_temperature(np.array([raw]), meta["temperature"])[0])
    return {
        "image": str(path),
        "raw_output": raw,
        "probability_pneumonia": proba,
        "threshold": threshold,
        "label": CLASS_NAMES[label],
        "confidence": proba if label else 1.0 - proba,
        "image_array": image[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pneumo_utils.predict",
        description="Predict NORMAL/PNEUMONIA for one chest X-ray (research use only).",
    )
    parser.add_argument("image", help="JPEG, PNG or DICOM file")
    parser.add_argument(
        "--model", required=True, help="MODEL.keras (its MODEL.json sidecar is read too)"
    )
    parser.add_argument("--gradcam", metavar="OUT.png", help="also write a Grad-CAM overlay here")
    args = parser.parse_args(argv)

    import cv2

    from pneumo_utils.images import ImageReadError, read_image

    if not Path(args.image).is_file():
        print(f"error: image file {args.image} does not exist", file=sys.stderr)
        return 2
    try:
        read_image(args.image, max_side=64)  # a bad image fails fast, before TensorFlow loads
    except (ImageReadError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)

    from pneumo_utils.models import ModelFileError, load_model

    try:
        model, meta = load_model(args.model)
        result = predict_image(model, meta, args.image)
    except (ImageReadError, ModelFileError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    print(f"Prediction: {result['label']} ({result['confidence']:.2%} confidence)")
    print(
        f"P(PNEUMONIA) = {result['probability_pneumonia']:.4f}, threshold {result['threshold']:.4f} "
        f"({meta.get('threshold_rule', 'default')}). Not for diagnostic use."
    )
    if args.gradcam:
        from pneumo_utils.gradcam import grad_cam, overlay

        heat = grad_cam(model, result["image_array"][None])[0]
        picture = overlay(result["image_array"], heat)
        Path(args.gradcam).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(args.gradcam, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        print(f"Grad-CAM overlay written to {args.gradcam}")
    return 0


def _fail(exc: Exception) -> int:
    """Print ``error: <message>`` as one line on stderr (no traceback); exit status 2."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
