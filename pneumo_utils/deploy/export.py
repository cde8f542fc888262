"""Exporting a saved model for fast, TensorFlow-free inference; slimming a ``.keras`` file.

``pneumo export --model M.keras [--format tflite|onnx|savedmodel]
[--quantize none|fp16|int8 --calibration DIR] [--slim]`` writes the export beside the model:

========== ============ ==================================================================
format     quantize     file
========== ============ ==================================================================
tflite     none         ``M.tflite`` (LiteRT, float32), run by ``ai-edge-litert``
tflite     fp16         ``M.fp16.tflite``: float16 weights (half the size), float32 compute
tflite     int8         ``M.int8.tflite``: int8 weights and activations calibrated on
                        ``--calibration`` images; float32 input and output
onnx       none         ``M.onnx`` (float32), run by ``onnxruntime``
onnx       int8         ``M.int8.onnx``: static QDQ int8 calibrated on ``--calibration``
savedmodel none         ``M.savedmodel/`` (TensorFlow Serving; needs TensorFlow to run)
========== ============ ==================================================================

Every export keeps the model's input contract (``(batch, n, n, 3)`` float32 RGB pixels in
0-255 at the model's image size, preprocessing inside) and its output (one sigmoid unit for a
binary task, one softmax unit per class for three classes; the sidecar names the task, and
:mod:`pneumo_utils.model.inference` checks the export's output width against it) and is made by
TensorFlow's and Keras' own converters (``model.export``: ``tf.lite.TFLiteConverter`` for
LiteRT with built-in ops only, so the plain LiteRT runtime runs it; ``tf2onnx`` for ONNX;
``onnxruntime.quantization`` for ONNX int8). After writing, the export is run on a few
images beside the ``.keras`` model and the largest difference in any output probability is
recorded, with the decisions that changed; a float32 export that differs by more than
:data:`FP32_TOLERANCE`, or changes a decision the tolerance does not explain, is an error; a
quantised export that differs by more than :data:`QUANTISED_WARNING` is written with a warning
(on stderr, in the sidecars and in the card).

The float32 exports share the model's sidecar ``M.json`` (same stem); the quantised exports of
one kind share their own (``M.int8.json`` for ``M.int8.tflite`` and ``M.int8.onnx``), a copy
naming the quantisation and the source model. The model's sidecar lists
every export (``exports``: file, format, quantisation, bytes, agreement) and the model card
``M.md`` gets an "Exports" table. ``--slim`` rewrites ``M.keras`` without optimizer state.
Research use only; not for diagnostic use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from pneumo_utils.cli import fail
from pneumo_utils.files import file_digest, write_json_atomic, write_text_atomic
from pneumo_utils.sidecar import ModelFileError, fingerprint, signed

FORMATS = ("tflite", "onnx", "savedmodel")
QUANTIZATIONS = ("none", "fp16", "int8")
SUPPORTED: dict[str, tuple[str, ...]] = {
    "tflite": ("none", "fp16", "int8"),
    "onnx": ("none", "int8"),
    "savedmodel": ("none",),
}
"""Quantisations each format offers."""
FP32_TOLERANCE = 0.02
"""Largest probability difference accepted between a float32 export and its ``.keras``.

Set by what :class:`~pneumo_utils.model.preprocessing.HistogramEqualization` does with float
differences: it rounds each pixel's grey level, and after the centre crop's resize LiteRT's
arithmetic puts some pixels on the other side of a bin edge (a ``.5``) than TensorFlow's does
(none at 32-64 px, up to hundreds per image at 96-224 px); each such pixel's equalised value
moves by one bin, a few grey levels where the next bin is crowded. For a MobileNetV2 at 224 px
(ImageNet weights, crop 0.8, a head trained on 300 bacterial and viral images) that moved
logits by up to 0.045, i.e. probabilities by up to 0.011 near 0.5 (measured: 3e-4 on the 8
generated check images, 1.3e-3 on 64, 9e-3 on 100 official-test images). The tolerance is
twice that bound; a converter that changes the model moves probabilities far more, and the
decisions are checked as well (:func:`decision_changes`)."""
QUANTISED_WARNING = 0.1
"""Largest probability difference a quantised export may show on the check images without a
warning: beyond it, int8 ranges that do not fit the model move confident answers across the
threshold (such exports have shown 0.4-0.99)."""
CALIBRATION_IMAGES = 100
"""Images read from ``--calibration`` (a seeded sample when the folder holds more)."""
_CHECK_IMAGES = 8
_CARD_HEADING = "## Exports"


class ExportError(RuntimeError):
    """A model could not be exported (unsupported op, bad option, missing package)."""


class ExportWarning(UserWarning):
    """A quantised export answers far from its ``.keras`` model (see :data:`QUANTISED_WARNING`)."""


def export_path(model_path: str | os.PathLike, format: str, quantize: str = "none") -> Path:
    """Where the export of ``model_path`` in ``format``/``quantize`` is written (beside it)."""
    model_path = Path(model_path)
    suffix = {"tflite": ".tflite", "onnx": ".onnx", "savedmodel": ".savedmodel"}[format]
    tag = "" if quantize == "none" else f".{quantize}"
    return model_path.with_name(model_path.stem + tag + suffix)


def calibration_images(
    folder: str | os.PathLike, image_size: int, limit: int = CALIBRATION_IMAGES, seed: int = 0
) -> np.ndarray:
    """Up to ``limit`` readable images under ``folder`` (recursively, a seeded sample when
    there are more) as ``(n, image_size, image_size, 3)`` float32 in 0-255.

    Use images like those the model will see (e.g. the training split): int8 ranges are
    fitted to them. Unreadable files are skipped; a folder with none raises ``ValueError``.
    """
    from pneumo_utils.data.images import ImageReadError, is_image_file, read_resized

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    rng = np.random.default_rng(seed)
    if len(files) > limit:
        files = [files[i] for i in sorted(rng.choice(len(files), size=limit, replace=False))]
    images = []
    for path in files:
        try:
            images.append(read_resized(path, image_size))
        except (ImageReadError, OSError):
            continue
    if not images:
        raise ValueError(f"calibration folder {folder} holds no readable .jpeg/.jpg/.png/.dcm image")
    return np.stack(images).astype(np.float32)


def generated_images(image_size: int, n: int = _CHECK_IMAGES, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB images ``(n, size, size, 3)`` float32 in 0-255, spanning dark
    to bright, for checking an export against its model when no real images are given."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 8, 8, 1))
    ramp = np.linspace(0.3, 1.0, n)[:, None, None, None]
    images = np.kron(coarse, np.ones((1, -(-image_size // 8), -(-image_size // 8), 1)))
    images = images[:, :image_size, :image_size] * ramp + rng.normal(0, 8, (n, image_size, image_size, 1))
    return np.repeat(np.clip(images, 0, 255), 3, axis=-1).astype(np.float32)


def decision_changes(
    expected: np.ndarray, got: np.ndarray, threshold: float | None = 0.5,
    tolerance: float = FP32_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Which images an export decides differently from its ``.keras`` model.

    ``expected`` and ``got`` are the two models' outputs: ``(n,)`` or ``(n, 1)`` probabilities
    of the positive class, decided at ``threshold``, or ``(n, K)`` softmax probabilities,
    decided by argmax. Returns two boolean masks ``(n,)``: the changed decisions, and those of
    them ``tolerance`` cannot explain. A change of at most ``tolerance`` per probability can
    flip only an image within ``tolerance`` of the threshold, or whose two most probable
    classes are within ``2 * tolerance`` of each other; any other change means the export is
    another model.
    """
    expected, got = np.asarray(expected, dtype=float), np.asarray(got, dtype=float)
    if expected.ndim == 2 and expected.shape[1] > 1:
        changed = expected.argmax(axis=1) != got.argmax(axis=1)
        top_two = np.sort(expected, axis=1)[:, -2:]
        near = top_two[:, 1] - top_two[:, 0] <= 2 * tolerance
    else:
        threshold = 0.5 if threshold is None else threshold
        expected, got = expected.reshape(-1), got.reshape(-1)
        changed = (expected >= threshold) != (got >= threshold)
        near = np.abs(expected - threshold) <= tolerance
    return changed, changed & ~near


def check_options(format: str, quantize: str, has_calibration: bool) -> None:
    """Raise :class:`ExportError` saying what to change when ``format``/``quantize`` is not
    offered (see :data:`SUPPORTED`) or ``int8`` comes without calibration images."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize not in SUPPORTED[format]:
        raise ExportError(
            f"{format} export offers --quantize {', '.join(SUPPORTED[format])}, not {quantize!r}"
        )
    if quantize == "int8" and not has_calibration:
        raise ExportError("--quantize int8 needs --calibration DIR: a folder of images like the "
                          "training data, to fit the int8 ranges")


def convert(
    model,
    target: str | os.PathLike,
    format: str = "tflite",
    quantize: str = "none",
    calibration: np.ndarray | None = None,
) -> Path:
    """Write ``model`` (a Keras model) to ``target`` in ``format`` with ``quantize``.

    ``calibration`` ``(n, size, size, 3)`` float32 images are required for ``int8``. The
    write is atomic (a temporary file or folder, then a rename). Raises
    :class:`ExportError` naming the ops a converter cannot handle.
    """
    check_options(format, quantize, has_calibration=calibration is not None and len(calibration) > 0)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model = _inference_only(model)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        written = work / target.name
        if format == "tflite":
            _to_litert(model, written, quantize, calibration)
        elif format == "onnx":
            _to_onnx(model, written, quantize, calibration, work)
        else:
            model.export(str(written), format="tf_saved_model", verbose=False)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(written, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _inference_only(model):
    """``model`` called with ``training=False`` inside a new functional model whose input is
    named ``image``. Keras' ONNX and SavedModel exporters call a model without ``training``,
    which leaves the dropout of a nested model in the graph (tf2onnx then fails on its
    random op); Keras exports only a model that has run, so it runs once here."""
    import keras

    side = int(model.inputs[0].shape[1])
    inputs = keras.Input((side, side, 3), name="image")
    wrapped = keras.Model(inputs, model(inputs, training=False), name=model.name)
    wrapped(np.zeros((1, side, side, 3), np.float32))
    return wrapped


def _to_litert(model, target: Path, quantize: str, calibration: np.ndarray | None) -> None:
    import tensorflow as tf

    options: dict = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantize != "none":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "fp16":
        options["target_spec"]["supported_types"] = [tf.float16]
    if quantize == "int8":
        def representative():
            for image in calibration:
                yield [image[None]]

        options["representative_dataset"] = representative
    try:
        model.export(str(target), format="litert", verbose=False, **options)
    except Exception as exc:  # the converter raises ConverterError and others
        raise ExportError(f"LiteRT conversion failed: {_converter_message(exc)}") from None


def _converter_message(exc: Exception) -> str:
    """The line of a converter error that names the unsupported ops, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "ops:" in line or "is neither a custom op" in line]
    return "; ".join(named[:3]) or (lines[0] if lines else type(exc).__name__)


def _to_onnx(model, target: Path, quantize: str, calibration, work: Path) -> None:
    import warnings

    float_path = target if quantize == "none" else work / "float.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probing np.object
            model.export(str(float_path), format="onnx", verbose=False)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs tf2onnx ({exc}): pip install 'pneumo[export]'") from None
    except Exception as exc:
        raise ExportError(f"ONNX conversion failed: {_converter_message(exc)}") from None
    if quantize == "int8":
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration[i: i + 1] for i in range(len(calibration)))

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {"image": batch}

        quantize_static(str(float_path), str(target), Reader(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True)


def export_model(
    model_path: str | os.PathLike,
    format: str = "tflite",
    quantize: str = "none",
    calibration: str | os.PathLike | None = None,
) -> dict:
    """Export the saved model ``model_path`` (``.keras`` with its sidecar) beside itself.

    Writes the export (see :func:`export_path`), its sidecar when quantised, lists it under
    ``exports`` in the model's sidecar and in the model card's "Exports" table (both
    rewritten, the card only when it exists). The sidecar that describes the export records
    its SHA-256 under ``sha256`` and is signed again (:func:`pneumo_utils.sidecar.signed`;
    :func:`pneumo_utils.sidecar.check_fingerprint` reads both). ``calibration``
    is a folder of images like the training data (required for ``int8``; when given, the agreement check runs on them).
    Returns the export's entry: file, format, quantisation, bytes, agreement (largest
    probability difference, decisions changed) and, for a quantised export beyond
    :data:`QUANTISED_WARNING`, ``warning`` (also in its sidecar and the card, and raised as
    :class:`ExportWarning`). A float32 export beyond :data:`FP32_TOLERANCE` raises
    :class:`ExportError`.
    """
    from pneumo_utils.model.inference import ExportedModel
    from pneumo_utils.model.saving import load_model, sidecar_path

    check_options(format, quantize, has_calibration=calibration is not None)
    model_path = Path(model_path)
    model, meta = load_model(model_path)
    size = int(meta["image_size"])
    images = (calibration_images(calibration, size) if calibration is not None
              else generated_images(size))
    target = convert(model, export_path(model_path, format, quantize), format, quantize,
                     calibration=images if quantize == "int8" else None)
    entry = {
        "file": target.name,
        "format": format,
        "quantization": quantize,
        "bytes": _size(target),
    }
    if format != "savedmodel":
        expected = model.predict(images, verbose=0)
        got = ExportedModel(target).predict(images).reshape(expected.shape)
        difference = float(np.max(np.abs(got - expected)))
        changed, unexplained = decision_changes(expected, got, meta.get("threshold"))
        source = str(calibration) if calibration is not None else "generated"
        entry["agreement"] = {
            "images": len(images),
            "source": source,
            "max_abs_probability_difference": difference,
            "decisions_changed": int(changed.sum()),
        }
        if quantize == "none" and (difference > FP32_TOLERANCE or unexplained.any()):
            raise ExportError(
                f"{target} gives probabilities up to {difference:.2g} away from {model_path.name} "
                f"(tolerance {FP32_TOLERANCE}) and changes {int(changed.sum())} of {len(images)} "
                "decisions; the converter changed the model, do not use it"
            )
        if quantize != "none" and difference > QUANTISED_WARNING:
            entry["warning"] = (
                f"{target.name} gives probabilities up to {difference:.2g} away from "
                f"{model_path.name} on {len(images)} {source} images and changes "
                f"{int(changed.sum())} decisions: the {quantize} ranges do not fit this model; "
                f"check it on labelled images (pneumo evaluate) or use the "
                "float32 or fp16 export"
            )
            warnings.warn(entry["warning"], ExportWarning, stacklevel=2)
    source_meta = _raw_sidecar(sidecar_path(model_path))
    digest = {format: file_digest(target)} if format != "savedmodel" else {}
    if quantize != "none":
        own = {k: v for k, v in (source_meta or meta).items()
               if k not in ("exports", "sha256", "fingerprint")}
        if "warning" in entry:
            own["warning"] = entry["warning"]
        previous = _raw_sidecar(sidecar_path(target)) or {}
        intact = previous.get("fingerprint") == fingerprint(previous)
        kept = (previous.get("sha256", {})
                if intact and previous.get("exported_from") == model_path.name else {})
        write_json_atomic(sidecar_path(target),
                          signed({**own, "quantization": quantize, "exported_from": model_path.name},
                                 {**kept, **digest}))
    if source_meta is not None:
        exports = [e for e in source_meta.get("exports", []) if e.get("file") != entry["file"]]
        source_meta["exports"] = [*exports, entry]
        digests = source_meta.get("sha256", {})
        if quantize == "none":
            digests = {**digests, **digest}
        write_json_atomic(sidecar_path(model_path), signed(source_meta, digests))
        _update_card(model_path.with_suffix(".md"), source_meta["exports"])
    return entry


def _raw_sidecar(path: Path) -> dict | None:
    """The sidecar as written (all fields), or ``None`` when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.2f} MB" if size < 10 * 2**20 else f"{size / 2**20:.1f} MB"


def _update_card(card: Path, exports: list[dict]) -> None:
    """Replace (or add) the model card's "Exports" section with one row per export."""
    if not card.is_file():
        return
    text = card.read_text()
    start = text.find("\n" + _CARD_HEADING + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    rows = "\n".join(
        f"| `{e['file']}` | {e['format']} | {e['quantization']} | {_megabytes(e['bytes'])} | "
        + (f"{e['agreement']['max_abs_probability_difference']:.2g} on "
           f"{e['agreement']['images']} {e['agreement']['source']} images"
           if "agreement" in e else "not checked (needs TensorFlow)") + " |"
        for e in exports
    )
    section = (
        f"{_CARD_HEADING}\nSame input (RGB 0-255, preprocessing inside), output and decision as "
        "the `.keras` model; run with `pneumo predict IMAGE --model FILE`.\n\n"
        "| file | format | quantisation | size | largest probability difference vs `.keras` |\n"
        f"|---|---|---|---|---|\n{rows}\n"
        + "".join(f"\n**Warning:** {e['warning']}\n" for e in exports if "warning" in e)
    )
    write_text_atomic(card, text.rstrip("\n") + "\n\n" + section)


def slim(model_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-save a ``.keras`` model without its optimizer state (and compile settings).

    Keras 3 writes a compiled model's optimizer variables (Adam: two per trained weight)
    into the ``.keras`` archive; prediction, evaluation and export never use them. The model
    is loaded without compiling and saved again, atomically, to ``out`` (default: in place),
    with its sidecar copied (the ``.keras`` digest renewed, the exports' kept: the weights do
    not change). Fine-tuning from the slim file starts a new optimizer.
    """
    from pneumo_utils.model.saving import load_model, save_model, sidecar_path

    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path
    model, meta = load_model(model_path)
    raw = _raw_sidecar(sidecar_path(model_path))
    save_model(model, out, raw if raw is not None else meta)
    exported = {k: v for k, v in (raw or {}).get("sha256", {}).items() if k != "keras"}
    if exported:  # the weights are unchanged, so the exports still match
        saved = _raw_sidecar(sidecar_path(out))
        write_json_atomic(sidecar_path(out), signed(saved, {**saved["sha256"], **exported}))
    card = model_path.with_suffix(".md")
    if out != model_path and card.is_file():
        shutil.copyfile(card, out.with_suffix(".md"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumo export",
        description="Export a saved pneumo model to LiteRT, ONNX or SavedModel beside it "
        "(research use only).",
    )
    parser.add_argument("--model", required=True, help="MODEL.keras (its MODEL.json sidecar is read too)")
    parser.add_argument("--format", choices=FORMATS,
                        help="tflite (LiteRT), onnx or savedmodel (default tflite unless only --slim)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="none (float32), fp16 (tflite) or int8 (tflite, onnx; needs --calibration)")
    parser.add_argument("--calibration", metavar="DIR",
                        help="folder of images like the training data, for int8 ranges and the check")
    parser.add_argument("--slim", action="store_true",
                        help="rewrite MODEL.keras without optimizer state (smaller file)")
    args = parser.parse_args(argv)

    if args.calibration is not None and not Path(args.calibration).is_dir():
        return fail(f"--calibration {args.calibration} is not a folder")
    fmt = args.format or (None if args.slim and args.quantize == "none" else "tflite")
    try:
        if fmt is not None:
            check_options(fmt, args.quantize, has_calibration=args.calibration is not None)
        if args.slim:
            before = Path(args.model).stat().st_size if Path(args.model).is_file() else 0
            path = slim(args.model)
            print(f"{path}: {_megabytes(before)} -> {_megabytes(path.stat().st_size)} "
                  "(optimizer state removed)")
        if fmt is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ExportWarning)
                entry = export_model(args.model, fmt, args.quantize, args.calibration)
            for warning in caught:
                if issubclass(warning.category, ExportWarning):
                    print("warning: " + " ".join(str(warning.message).split()), file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename,
                                         warning.lineno)
            agreement = entry.get("agreement")
            check = (f"; largest probability difference {agreement['max_abs_probability_difference']:.2g} "
                     f"on {agreement['images']} {agreement['source']} images" if agreement else "")
            print(f"{Path(args.model).with_name(entry['file'])}: {fmt}, {args.quantize}, "
                  f"{_megabytes(entry['bytes'])}{check}")
    except (ExportError, ModelFileError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
