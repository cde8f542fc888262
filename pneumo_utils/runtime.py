"""Running an exported model (``.tflite`` or ``.onnx``) without TensorFlow.

An export written by :mod:`pneumo_utils.export` keeps the ``.keras`` model's input contract:
one ``(batch, n, n, 3)`` float32 array of RGB pixels in 0-255, preprocessing inside; and its
output: one sigmoid unit per image for a binary task, one softmax unit per class for
``three_class``. It travels with its own JSON sidecar (same stem), so a laptop or
workstation with only ``ai-edge-litert`` (for ``.tflite``) or ``onnxruntime`` (for
``.onnx``), NumPy and the image readers can answer in about a second: nothing here imports
TensorFlow or Keras, and the runtimes are imported only when a model of their kind is loaded.

:class:`ExportedModel` answers ``predict(images)`` and ``input_shape`` like a Keras model,
so :func:`pneumo_utils.predict.predict_images` takes either.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pneumo_utils.io import ModelFileError, check_output, read_sidecar, validate_metadata

EXPORT_SUFFIXES: dict[str, str] = {".tflite": "tflite", ".onnx": "onnx"}
"""File suffixes of the exports this module runs, and their format names."""

_RUNTIME_PACKAGES = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (by its suffix), not a ``.keras`` file."""
    return Path(path).suffix.lower() in EXPORT_SUFFIXES


class ExportedModel:
    """A ``.tflite`` or ``.onnx`` classifier loaded for inference on the CPU.

    ``threads`` is the number of CPU threads the runtime may use (``None``: its default,
    one per core). ``predict`` takes ``(batch, n, n, 3)`` pixels in 0-255 and returns
    ``(batch, output_units)`` float32 probabilities, as ``keras.Model.predict`` does
    (``output_units``: 1 for a sigmoid model, one per class for a softmax).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist")
        self.format = EXPORT_SUFFIXES.get(self.path.suffix.lower())
        if self.format is None:
            raise ModelFileError(
                f"{self.path} is not an exported model (expected a {' or '.join(EXPORT_SUFFIXES)} file)"
            )
        try:
            if self.format == "tflite":
                self._open_litert(threads)
            else:
                self._open_onnx(threads)
        except ImportError:
            package = _RUNTIME_PACKAGES[self.format]
            raise ModelFileError(
                f"running {self.path.name} needs the {package} package: "
                f"pip install {package} (or pip install 'pneumo[export]')"
            ) from None
        except (ValueError, RuntimeError, OSError) as exc:
            text = " ".join(str(exc).split())[:300]
            raise ModelFileError(
                f"cannot load {self.path} as a {self.format} model: {text}"
            ) from None
        self.input_shape, self.output_units = self._check_signature()

    def _open_litert(self, threads: int | None) -> None:
        """Create the LiteRT interpreter and apply its XNNPACK delegate (first allocation)
        with file descriptor 2 sent to ``os.devnull``: LiteRT's C++ logger prints "INFO:
        Created TensorFlow Lite XNNPACK delegate for CPU." there, below ``sys.stderr`` and
        ``TF_CPP_MIN_LOG_LEVEL``. Failures still arrive as Python exceptions."""
        import sys

        from ai_edge_litert.interpreter import Interpreter

        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
            self._interpreter.allocate_tensors()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
        (detail,) = self._interpreter.get_input_details()
        self._input_index, self._input_dtype = detail["index"], detail["dtype"]
        self._shape = tuple(int(s) for s in detail["shape_signature"])
        self._outputs = self._interpreter.get_output_details()
        self._output_shapes = [tuple(int(s) for s in o["shape_signature"]) for o in self._outputs]
        self._batch = None

    def _open_onnx(self, threads: int | None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        (detail,) = self._session.get_inputs()
        self._input_name, self._input_dtype = detail.name, detail.type
        self._shape = tuple(s if isinstance(s, int) else -1 for s in detail.shape)
        self._outputs = self._session.get_outputs()
        self._output_shapes = [tuple(s if isinstance(s, int) else -1 for s in o.shape)
                               for o in self._outputs]

    def _check_signature(self) -> tuple[tuple, int]:
        """``((None, n, n, 3), units)``, or :class:`ModelFileError` if the export does not take
        one square float32 RGB image per example and give one ``(batch, units)`` output."""
        dtype_ok = self._input_dtype in (np.float32, "tensor(float)")
        shape, outputs = self._shape, self._output_shapes
        if (len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] < 1
                or not dtype_ok or len(outputs) != 1 or len(outputs[0]) != 2 or outputs[0][1] < 1):
            raise ModelFileError(
                f"{self.path} must take (batch, n, n, 3) float32 RGB pixels and give one "
                f"(batch, units) output, as pneumo exports do; it takes {shape} and gives "
                f"{outputs}"
            )
        return (None, shape[1], shape[2], 3), outputs[0][1]

    def predict(self, images: np.ndarray, batch_size: int | None = None, verbose=0) -> np.ndarray:
        """Probabilities ``(batch, output_units)`` for ``images`` ``(batch, n, n, 3)`` in 0-255.

        ``batch_size`` splits the call (default: one call); ``verbose`` is accepted for
        compatibility with ``keras.Model.predict`` and ignored.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != tuple(self.input_shape[1:]):
            raise ValueError(
                f"{self.path.name} takes (batch, {self.input_shape[1]}, {self.input_shape[2]}, 3) "
                f"images, got {images.shape}"
            )
        step = batch_size or max(len(images), 1)
        parts = [self._run(images[i: i + step]) for i in range(0, len(images), step)]
        if not parts:
            return np.zeros((0, self.output_units), np.float32)
        return np.concatenate(parts).reshape(-1, self.output_units).astype(np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.format == "onnx":
            return self._session.run(None, {self._input_name: batch})[0]
        if self._batch != len(batch):
            self._interpreter.resize_tensor_input(self._input_index, batch.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input_index, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._outputs[0]["index"])


def load_exported(path: str | os.PathLike, threads: int | None = None) -> tuple[ExportedModel, dict]:
    """An exported model and its sidecar metadata (the analogue of
    :func:`pneumo_utils.models.load_model`, without TensorFlow).

    Raises ``FileNotFoundError`` for a missing file and :class:`ModelFileError` for a file
    the runtime cannot load, a missing runtime package, a sidecar that fails validation,
    whose ``image_size`` disagrees with the export's input, or whose task does not fit the
    export's output width (:func:`pneumo_utils.io.check_output`; an export's activation
    cannot be read, so more than one output unit needs a sidecar naming a multi-class task).
    Without a sidecar the metadata of a one-unit export is inferred (threshold 0.5).
    """
    model = ExportedModel(path, threads=threads)
    meta_file = Path(path).with_suffix(".json")
    meta = read_sidecar(meta_file)
    size = int(model.input_shape[1])
    if "image_size" in meta and int(meta["image_size"]) != size:
        raise ModelFileError(
            f"sidecar {meta_file} says image_size {meta['image_size']} but {path} takes "
            f"{size}x{size} input: the sidecar belongs to another model or was edited"
        )
    check_output(meta, model.output_units, path, f"sidecar {meta_file}")
    meta.setdefault("image_size", size)
    if model.output_units == 1:
        meta.setdefault("threshold", 0.5)
        meta.setdefault("threshold_rule", "default 0.5 (no sidecar)")
    return model, validate_metadata(meta, f"sidecar {meta_file}")


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities with a temperature from
    :func:`pneumo_utils.evaluate.fit_temperature`: ``sigmoid(logit(p) / T)``, with
    ``scipy.special`` (imported when called, so that prediction reads calibrated
    probabilities without loading scikit-learn)."""
    return sigmoid(logit(np.asarray(proba, dtype=float)) / temperature)


def apply_softmax_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale softmax probabilities ``(n, K)`` with a temperature from
    :func:`pneumo_utils.evaluate.fit_softmax_temperature`: ``softmax(log(p) / T)``.

    ``log(p)`` differs from the model's logits by a constant per row, which softmax ignores,
    so this equals dividing the logits by ``T``; the most probable class never changes."""
    proba = np.clip(np.asarray(proba, dtype=float), 1e-12, 1.0)
    return softmax(np.log(proba) / temperature)


def softmax(z: np.ndarray) -> np.ndarray:
    """``scipy.special.softmax`` along the last axis (one distribution per row)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(np.asarray(z, dtype=float), axis=-1)


def logit(p: np.ndarray) -> np.ndarray:
    """``scipy.special.logit`` of ``p`` clipped to ``[1e-7, 1 - 1e-7]``: a float32 sigmoid
    reaches exactly 0 and 1, whose logits would be infinite."""
    from scipy.special import logit as scipy_logit

    return scipy_logit(np.clip(p, 1e-7, 1 - 1e-7))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``scipy.special.expit``: ``1 / (1 + exp(-z))`` without overflow warnings."""
    from scipy.special import expit

    return expit(z)


def load_any(path: str | os.PathLike):
    """``(model, meta)`` for a ``.tflite``/``.onnx`` export (:func:`load_exported`, no
    TensorFlow) or a ``.keras`` model (:func:`pneumo_utils.models.load_model`, which
    imports TensorFlow)."""
    if is_exported(path):
        return load_exported(path)
    from pneumo_utils.models import load_model

    return load_model(path)


def predict_paths(model, paths: list[str], batch_size: int = 32, verbose: bool = False,
                  workers: int | None = None) -> np.ndarray:
    """Probabilities for image files, with an export or a Keras model: ``(n,)`` (P(positive
    class)) for a one-unit model, ``(n, K)`` for a ``K``-class softmax.

    A Keras model goes to :func:`pneumo_utils.models.predict_paths` (tf.data). For an
    :class:`ExportedModel`, images are decoded with
    :func:`pneumo_utils.images.read_resized` in ``workers`` threads (default one per CPU;
    the decoders release the GIL), the next batch decoding while the current one runs
    through the model; ``verbose`` shows a progress bar over the batches. Raises
    :class:`~pneumo_utils.images.ImageReadError` for an unreadable file.
    """
    if not isinstance(model, ExportedModel):
        from pneumo_utils.models import predict_paths as predict_with_keras

        return predict_with_keras(model, paths, batch_size=batch_size, verbose=verbose)
    from tqdm.auto import tqdm

    from pneumo_utils.images import read_resized

    size = int(model.input_shape[1])
    batches = [paths[i: i + batch_size] for i in range(0, len(paths), batch_size)]
    units = model.output_units
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        pending = [pool.submit(read_resized, p, size) for p in batches[0]] if batches else []
        for i in tqdm(range(len(batches)), desc="predict", unit="batch", disable=not verbose,
                      leave=False):
            images = np.stack([future.result() for future in pending])
            following = batches[i + 1] if i + 1 < len(batches) else []
            pending = [pool.submit(read_resized, p, size) for p in following]
            out.append(model.predict(images))
    proba = np.concatenate(out) if out else np.zeros((0, units), np.float32)
    return proba.reshape(-1) if units == 1 else proba
