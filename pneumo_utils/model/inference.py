"""Running a model on image files: a ``.keras`` model, or its ``.tflite``/``.onnx`` export
without TensorFlow.

An export written by :mod:`pneumo_utils.deploy.export` keeps the ``.keras`` model's input contract:
one ``(batch, n, n, 3)`` float32 array of RGB pixels in 0-255, preprocessing inside; and its
output: one sigmoid unit per image for a binary task, one softmax unit per class for
``three_class``. It travels with its own JSON sidecar (same stem), so a laptop or
workstation with only ``ai-edge-litert`` (for ``.tflite``) or ``onnxruntime`` (for
``.onnx``), NumPy and the image readers can answer in about a second: for exports nothing
here imports TensorFlow or Keras, and the runtimes are imported only when a model of their
kind is loaded. :func:`load_any` and :func:`predict_paths` take either kind of model, so
``predict``, ``evaluate`` and ``site_shift`` do not ask which one they hold.

:class:`ExportedModel` answers ``predict(images)`` and ``input_shape`` like a Keras model,
so :func:`pneumo_utils.deploy.predict.predict_images` takes either.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pneumo_utils.sidecar import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ModelFileError,
    check_fingerprint,
    check_output,
    check_probabilities,
    read_sidecar,
    validate_metadata,
)

EXPORT_SUFFIXES: dict[str, str] = {".tflite": "tflite", ".onnx": "onnx"}
"""File suffixes of the exports this module runs, and their format names."""

ONNX_OPS: frozenset[str] = frozenset({
    # written by pneumo's exporter (tf2onnx, onnxruntime's QDQ int8) for the scratch CNN,
    # MobileNetV2, ResNet50 and DenseNet121 classifiers and the cue-removal layers
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Conv", "CumSum", "DequantizeLinear",
    "Div", "Equal", "Expand", "Gather", "GatherND", "GlobalAveragePool", "Less", "MatMul",
    "Max", "MaxPool", "Min", "Mul", "Not", "Pad", "QuantizeLinear", "ReduceMean", "Relu",
    "Reshape", "Resize", "Round", "Shape", "Sigmoid", "Slice", "Softmax", "Squeeze", "Sub",
    "Tile", "Transpose", "Unsqueeze",
    # a margin of standard element-wise, pooling and reduction ops
    "Abs", "ArgMax", "BatchNormalization", "Ceil", "Erf", "Exp", "Flatten", "Floor", "Gemm",
    "GlobalMaxPool", "Greater", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log",
    "Mean", "Neg", "Pow", "QLinearConv", "QLinearMatMul", "ReduceMax", "ReduceMin",
    "ReduceSum", "Sqrt", "Tanh", "Where",
})
"""Operators (default ONNX domain) an ``.onnx`` export may use. Control flow (``Loop``,
``Scan``, ``If``), ``ConstantOfShape``, ``Range`` and custom domains are refused before
onnxruntime sees the file: a few hundred bytes of them can run for hours or fill memory;
``Expand``, ``Tile`` and ``Resize`` given constant sizes are bounded (:data:`MAX_GROWTH`,
:data:`MAX_REPEATS`)."""

MAX_GROWTH = 2**24
"""Largest number of elements of a constant shape (``Expand``, ``Resize`` sizes) in an
``.onnx`` export; the exporter's shapes are computed from the input at run time."""
MAX_REPEATS = 64
"""Largest product of constant ``Tile`` repeats or ``Resize`` scales in an ``.onnx`` export."""
_SIZE_INPUTS = {"Expand": ((1, MAX_GROWTH),), "Tile": ((1, MAX_REPEATS),),
                "Resize": ((2, MAX_REPEATS), (3, MAX_GROWTH))}

MAX_PAD = 64
"""Largest padding (pixels per side) a ``Pad`` node or a ``pads`` attribute of an ``.onnx``
export may add; the backbones pad by 3 at most."""

MAX_RUN_SECONDS = 600.0
"""Longest one ``.onnx`` batch may run before onnxruntime is told to stop (a 224 px
DenseNet121 batch of 32 takes a few seconds on a laptop)."""

BATCH_BYTES = 256 * 2**20
"""Memory budget of one batch of float32 model inputs: :func:`batch_size_for` lowers a batch
size that would stack more (32 images at 512 px take 100 MB)."""

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
        except (ValueError, RuntimeError, OSError, *_runtime_errors(self.format)) as exc:
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

        check_onnx_graph(self.path)
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
        if not MIN_IMAGE_SIZE <= shape[1] <= MAX_IMAGE_SIZE:
            raise ModelFileError(
                f"{self.path} takes {shape[1]}x{shape[2]} px input; pneumo models take "
                f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px (a larger input multiplies the memory "
                "of every batch): export a model of a size in that range"
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
        try:
            parts = [self._run(images[i: i + step]) for i in range(0, len(images), step)]
        except (RuntimeError, *_runtime_errors(self.format)) as exc:
            text = " ".join(str(exc).split())[:300]
            raise ModelFileError(f"{self.path} failed while predicting: {text}") from None
        if not parts:
            return np.zeros((0, self.output_units), np.float32)
        return np.concatenate(parts).reshape(-1, self.output_units).astype(np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.format == "onnx":
            import onnxruntime

            options = onnxruntime.RunOptions()
            options.log_severity_level = 3
            watchdog = threading.Timer(MAX_RUN_SECONDS, setattr, (options, "terminate", True))
            watchdog.daemon = True
            watchdog.start()
            try:
                return self._session.run(None, {self._input_name: batch}, options)[0]
            finally:
                watchdog.cancel()
        if self._batch != len(batch):
            self._interpreter.resize_tensor_input(self._input_index, batch.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input_index, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._outputs[0]["index"])


def _runtime_errors(format: str) -> tuple[type[BaseException], ...]:
    """The exception classes of ``format``'s runtime (onnxruntime raises its own
    ``InvalidProtobuf``, ``Fail``, ``InvalidArgument``..., which share no base class but
    ``Exception``), imported only when that runtime is installed."""
    if format != "onnx":
        return ()
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return ()
    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception))


def check_onnx_graph(path: str | os.PathLike) -> None:
    """Refuse an ``.onnx`` file whose graph uses an operator outside :data:`ONNX_OPS` (or
    outside the default domain) or pads by more than :data:`MAX_PAD`, before onnxruntime
    builds it. The file is read as protobuf wire format here, so neither the ``onnx``
    package nor a session is needed; a file that is not protobuf raises
    :class:`ModelFileError`."""
    path = Path(path)
    try:
        model = memoryview(path.read_bytes())
        graphs = [value for field, value in _protobuf_fields(model) if field == 7]
        if len(graphs) != 1:
            raise ValueError("no graph")
        nodes, constants = _onnx_nodes(graphs[0])
    except (ValueError, IndexError, TypeError):
        raise ModelFileError(
            f"{path} is not an ONNX model (its bytes are not an ONNX graph); export the "
            ".keras model again with pneumo export --format onnx"
        ) from None
    for op, domain, inputs, pads in nodes:
        if domain not in ("", "ai.onnx") or op not in ONNX_OPS:
            name = f"{domain}:{op}" if domain else op
            raise ModelFileError(
                f"{path} uses the ONNX operator {name}, which pneumo exports never contain "
                "(control flow, shape-generating or custom ops are refused: they can run "
                "unbounded); export the .keras model again with pneumo export"
            )
        if op == "Pad" and pads is None:
            pads = constants.get(inputs[1]) if len(inputs) > 1 else None
            if pads is None:
                pads = [MAX_PAD + 1]
        for slot, limit in _SIZE_INPUTS.get(op, ()):
            values = constants.get(inputs[slot]) if len(inputs) > slot else None
            if values is not None and np.prod(np.abs(np.asarray(values, float))) > limit:
                raise ModelFileError(
                    f"{path} has a {op} node making a tensor of constant size {values[:8]}, "
                    "larger than pneumo exports make; export the .keras model again with "
                    "pneumo export"
                )
        if pads is not None and (len(pads) == 0 or max(abs(int(v)) for v in pads) > MAX_PAD):
            raise ModelFileError(
                f"{path} has a {op} node padding by more than {MAX_PAD} px (or by an amount "
                "computed at run time), which pneumo exports never do; export the .keras "
                "model again with pneumo export"
            )


def _onnx_nodes(graph: memoryview, depth: int = 0) -> tuple[list[tuple], dict[str, list[int]]]:
    """``([(op_type, domain, inputs, pads attribute or None)], {initializer name: int64
    values})`` of an ONNX ``GraphProto``; nodes of sub-graphs (attributes) are included, so a
    ``Loop`` body cannot hide what it runs."""
    if depth > 8:
        raise ValueError("sub-graphs nested too deeply")
    nodes: list[tuple] = []
    constants: dict[str, list[int]] = {}
    for field, value in _protobuf_fields(graph):
        if field == 1:
            op, domain, inputs, pads = "", "", [], None
            for key, item in _protobuf_fields(value):
                if key == 4:
                    op = bytes(item).decode()
                elif key == 7:
                    domain = bytes(item).decode()
                elif key == 1:
                    inputs.append(bytes(item).decode())
                elif key == 5:
                    pads, sub = _onnx_attribute(item, pads, depth)
                    nodes += sub
            nodes.append((op, domain, inputs, pads))
        elif field == 5:
            name, values = _numeric_tensor(value)
            if values is not None:
                constants[name] = values
    return nodes, constants


def _onnx_attribute(attribute: memoryview, pads, depth: int) -> tuple[list[int] | None, list]:
    """An ONNX ``AttributeProto``: its values when it is ``pads`` (else ``pads`` unchanged),
    and the nodes of any graphs it holds."""
    name, ints, nodes = "", [], []
    for key, item in _protobuf_fields(attribute):
        if key == 1:
            name = bytes(item).decode()
        elif key == 8:
            ints += _varints(item) if isinstance(item, memoryview) else [item]
        elif key in (6, 11):
            nodes += _onnx_nodes(item, depth + 1)[0]
    return (ints if name == "pads" else pads), nodes


def _numeric_tensor(tensor: memoryview) -> tuple[str, list | None]:
    """Name and values of a small ONNX ``TensorProto`` of int64 or float32 data (``None``
    for other types and for tensors over 4 KB, which are weights, not sizes)."""
    name, data_type, values, raw = "", 0, [], None
    for key, item in _protobuf_fields(tensor):
        if key == 8:
            name = bytes(item).decode()
        elif key == 2:
            data_type = item
        elif key == 7:
            values += _varints(item) if isinstance(item, memoryview) else [item]
        elif key == 4 and isinstance(item, memoryview):
            values += np.frombuffer(item, dtype="<f4").tolist() if len(item) <= 4096 else []
        elif key == 9:
            raw = item
    dtype = {1: "<f4", 7: "<i8"}.get(data_type)
    if dtype is None:
        return name, None
    if raw is not None:
        return name, np.frombuffer(raw, dtype=dtype).tolist() if len(raw) <= 4096 else None
    if data_type == 7:
        values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    return name, values


def _protobuf_fields(buffer: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """``(field number, value)`` of each field of a protobuf message: an int for varints,
    a view of the bytes for length-delimited fields; fixed-width fields are skipped.
    Raises ``ValueError`` on bytes that are not a protobuf message."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
            yield field, value
        elif wire == 2:
            length, position = _varint(buffer, position)
            if position + length > end:
                raise ValueError("truncated field")
            yield field, buffer[position: position + length]
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        if field == 0 or position > end:
            raise ValueError("not a protobuf message")


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise ValueError("truncated varint")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _varints(buffer: memoryview) -> list[int]:
    """The values of a packed repeated varint field (signed 64-bit)."""
    values, position = [], 0
    while position < len(buffer):
        value, position = _varint(buffer, position)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values


def batch_size_for(image_size: int, batch_size: int) -> int:
    """``batch_size`` lowered so that one batch of ``image_size`` px float32 RGB inputs fits
    :data:`BATCH_BYTES` (at least 1)."""
    per_image = int(image_size) ** 2 * 3 * 4
    return max(1, min(int(batch_size), BATCH_BYTES // per_image))


def load_exported(path: str | os.PathLike, threads: int | None = None) -> tuple[ExportedModel, dict]:
    """An exported model and its sidecar metadata (the analogue of
    :func:`pneumo_utils.model.saving.load_model`, without TensorFlow).

    Raises ``FileNotFoundError`` for a missing file and :class:`ModelFileError` for a file
    the runtime cannot load, a missing runtime package, a sidecar that fails validation,
    whose ``image_size`` disagrees with the export's input, or whose task does not fit the
    export's output width (:func:`pneumo_utils.sidecar.check_output`; an export's activation
    cannot be read, so more than one output unit needs a sidecar naming a multi-class task),
    or that lacks its fingerprint, records another file's SHA-256 or was edited after it was
    written (:func:`pneumo_utils.sidecar.check_fingerprint`). Without a sidecar the metadata of a one-unit export is inferred (threshold 0.5).
    """
    meta_file = Path(path).with_suffix(".json")
    meta = read_sidecar(meta_file)
    model = ExportedModel(path, threads=threads)
    check_fingerprint(meta, path, f"sidecar {meta_file}")
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


def load_any(path: str | os.PathLike):
    """``(model, meta)`` for a ``.tflite``/``.onnx`` export (:func:`load_exported`, no
    TensorFlow) or a ``.keras`` model (:func:`pneumo_utils.model.saving.load_model`, which
    imports TensorFlow)."""
    if is_exported(path):
        return load_exported(path)
    from pneumo_utils.model.saving import load_model

    return load_model(path)


def predict_paths(model, paths: list[str], batch_size: int = 32, verbose: bool = False,
                  workers: int | None = None) -> np.ndarray:
    """Probabilities for image files, with a Keras model or an export: ``(n,)`` (P(positive
    class)) for a one-unit model, ``(n, K)`` for a ``K``-class softmax.

    A Keras model reads the files through :func:`pneumo_utils.data.pipelines.image_dataset`
    (tf.data, decoded in parallel); ``verbose`` prints Keras' one closing line (batches,
    seconds, time per batch) on stderr. For an :class:`ExportedModel`, images are decoded with
    :func:`pneumo_utils.data.images.read_resized` in ``workers`` threads (default one per CPU;
    the decoders release the GIL), the next batch decoding while the current one runs
    through the model; ``verbose`` shows a ``tqdm`` bar over the batches. ``batch_size`` is
    lowered to fit :data:`BATCH_BYTES`. Raises
    :class:`~pneumo_utils.data.images.ImageReadError` for an unreadable file and
    :class:`~pneumo_utils.sidecar.ModelFileError` for outputs that are not probabilities
    (:func:`~pneumo_utils.sidecar.check_probabilities`).
    """
    size = int(model.input_shape[1])
    batch_size = batch_size_for(size, batch_size)
    if isinstance(model, ExportedModel):
        proba, name = _predict_exported(model, paths, batch_size, verbose, workers), model.path
    else:
        from pneumo_utils.data.pipelines import image_dataset

        dataset = image_dataset(paths, image_size=size, batch_size=batch_size, cache=False)
        with contextlib.redirect_stdout(sys.stderr):  # stdout may carry a command's JSON
            proba, name = model.predict(dataset, verbose=2 if verbose else 0), "the model"
    proba = check_probabilities(np.asarray(proba), name).astype(np.float32)
    return proba.reshape(-1) if proba.shape[-1] == 1 else proba


def _predict_exported(model: ExportedModel, paths: list[str], batch_size: int, verbose: bool,
                      workers: int | None) -> np.ndarray:
    """``(n, output_units)`` outputs of an export, decoding the next batch while one runs."""
    from tqdm.auto import tqdm

    from pneumo_utils.data.images import read_resized

    size = int(model.input_shape[1])
    batches = [paths[i: i + batch_size] for i in range(0, len(paths), batch_size)]
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        pending = [pool.submit(read_resized, p, size) for p in batches[0]] if batches else []
        for i in tqdm(range(len(batches)), desc="predict", unit="batch", disable=not verbose,
                      leave=False):
            images = np.stack([future.result() for future in pending])
            following = batches[i + 1] if i + 1 < len(batches) else []
            pending = [pool.submit(read_resized, p, size) for p in following]
            out.append(model.predict(images))
    return np.concatenate(out) if out else np.zeros((0, model.output_units), np.float32)
