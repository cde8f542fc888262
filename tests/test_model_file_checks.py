"""Bad model files, sidecars and outputs: each is refused in one line, exit 2.

The ``.onnx`` files are generated here with ``onnx.helper`` (a few hundred bytes each); the
Keras models are a few layers at 32 px, never trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils import files, sidecar
from pneumo_utils.deploy import predict
from pneumo_utils.files import write_json_atomic
from pneumo_utils.sidecar import ModelFileError, read_sidecar, validate_metadata

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")
from onnx import TensorProto, helper  # noqa: E402

from pneumo_utils.evaluation import evaluate  # noqa: E402
from pneumo_utils.model import backbones, inference, saving  # noqa: E402

SIZE = 32


def _onnx(path: Path, nodes: list, size: int = SIZE, units: int = 1, initializers=(),
          opset: int = 15, domains: tuple = ()) -> Path:
    """An ``.onnx`` file taking ``(N, size, size, 3)`` float ``image`` and giving ``(N, units)``
    ``out`` through ``nodes``."""
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", units])],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _mean_pixel(path: Path, scale: float = 1.0, units: int = 1, size: int = SIZE) -> Path:
    """An export whose output is ``scale`` times the mean pixel (0-255): not a probability."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])
    factor = helper.make_tensor("factor", TensorProto.FLOAT, [units], [scale] * units)
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3]),
             helper.make_node("Reshape", ["m", "shape"], ["flat"]),
             helper.make_node("Mul", ["flat", "factor"], ["out"])]
    return _onnx(path, nodes, size=size, units=units, initializers=[shape, factor])


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "x.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    return path


def _tiny(seed: int = 0) -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, out)
    model.get_layer("head_output").set_weights(
        [np.random.default_rng(seed).normal(0, 3, (3, 1)).astype("float32"), np.zeros(1, "float32")])
    return model


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("content", [
    b"", b"not an onnx model\n", np.random.default_rng(0).bytes(600),
    b"PK\x03\x04" + b"\x00" * 200,
], ids=["empty", "text", "random", "zip"])
def test_onnx_that_is_not_onnx_is_one_line(tmp_path, image, content, error_line):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    assert predict.main([str(image), "--model", str(path)]) == 2
    assert "m.onnx" in error_line()


def test_keras_renamed_onnx_is_one_line(tmp_path, image, error_line):
    keras_file = tmp_path / "tiny.keras"
    _tiny().save(keras_file)
    path = tmp_path / "m.onnx"
    path.write_bytes(keras_file.read_bytes())
    assert predict.main([str(image), "--model", str(path)]) == 2
    assert "m.onnx" in error_line()


def test_runtime_errors_of_onnxruntime_become_model_file_errors(tmp_path, monkeypatch):
    """onnxruntime's own exceptions (InvalidProtobuf, Fail, ...) share no base class with
    ValueError; they are caught, named by the file."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

    path = _mean_pixel(tmp_path / "m.onnx", scale=1 / 255)
    monkeypatch.setattr(inference, "check_onnx_graph", lambda path: None)

    def refuse(*args, **kwargs):
        raise InvalidProtobuf("Protobuf parsing failed")

    import onnxruntime
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(ModelFileError, match="cannot load .*m.onnx.*Protobuf parsing failed"):
        inference.ExportedModel(path)


@pytest.mark.parametrize("case", ["custom_op", "loop", "constant_of_shape", "huge_pad", "huge_tile"])
def test_onnx_ops_outside_the_exporters_set_are_refused(tmp_path, image, case, error_line):
    """A few hundred bytes of Loop (10^12 iterations), ConstantOfShape [20000, 20000] or a
    custom op would hang or fill memory; they are refused before onnxruntime builds them."""
    path = tmp_path / "m.onnx"
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])
    reduce = helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3])
    tail = [helper.make_node("Reshape", ["m", "shape"], ["r"]),
            helper.make_node("Sigmoid", ["r"], ["out"])]
    inits, domains = [shape], ()
    if case == "custom_op":
        nodes = [helper.make_node("Mystery", ["image"], ["x"], domain="evil.ops"),
                 helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3]), *tail]
        domains = ("evil.ops",)
    elif case == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
        inits += [helper.make_tensor("n", TensorProto.INT64, [], [10**12]),
                  helper.make_tensor("c", TensorProto.BOOL, [], [True])]
        nodes = [helper.make_node("Loop", ["n", "c"], [], body=body), reduce, *tail]
    elif case == "constant_of_shape":
        inits.append(helper.make_tensor("big", TensorProto.INT64, [2], [20000, 20000]))
        nodes = [helper.make_node("ConstantOfShape", ["big"], ["zeros"]), reduce, *tail]
    elif case == "huge_pad":
        inits.append(helper.make_tensor("pads", TensorProto.INT64, [8], [0, 9000, 9000, 0] * 2))
        nodes = [helper.make_node("Pad", ["image", "pads"], ["p"]),
                 helper.make_node("ReduceMean", ["p"], ["m"], axes=[1, 2, 3]), *tail]
    else:
        inits.append(helper.make_tensor("reps", TensorProto.INT64, [4], [1, 1000, 1000, 1]))
        nodes = [helper.make_node("Tile", ["image", "reps"], ["t"]),
                 helper.make_node("ReduceMean", ["t"], ["m"], axes=[1, 2, 3]), *tail]
    _onnx(path, nodes, initializers=inits, domains=domains)
    assert path.stat().st_size < 2000
    assert predict.main([str(image), "--model", str(path)]) == 2
    line = error_line()
    assert "m.onnx" in line and "export" in line


@pytest.mark.parametrize("size", [4096, 8])
def test_declared_input_size_outside_the_bounds_is_refused(tmp_path, image, size, error_line):
    """A 278-byte export declaring a 4096 px input would take 200 MB per image."""
    path = _mean_pixel(tmp_path / "m.onnx", scale=1 / 255, size=size)
    assert predict.main([str(image), "--model", str(path)]) == 2
    assert f"{size}x{size} px input" in error_line()


def test_keras_model_with_a_huge_input_is_refused(tmp_path):
    inputs = keras.Input((1024, 1024, 3))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "big.keras"
    keras.Model(inputs, out).save(path)
    with pytest.raises(ModelFileError, match="1024x1024 px input; pneumo models take 32 to 512"):
        saving.load_model(path)


def test_batches_fit_the_memory_budget():
    assert inference.batch_size_for(224, 32) == 32
    assert inference.batch_size_for(512, 10_000) * 512 * 512 * 3 * 4 <= inference.BATCH_BYTES
    assert inference.batch_size_for(512, 1) == 1


def test_exports_the_exporter_writes_pass_the_op_check(tmp_path):
    """The small models' real export (scratch CNN behind the cue-removal layers) passes."""
    pytest.importorskip("tf2onnx")
    from pneumo_utils.deploy import export
    from pneumo_utils.model.preprocessing import cue_removal

    inner = backbones.build_scratch_cnn(SIZE, filters=(4,), dense_units=4, seed=0)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    model = keras.Model(inputs, inner(cue_removal(inputs, crop_fraction=0.8)))
    target = export.convert(model, tmp_path / "m.onnx", "onnx")
    inference.check_onnx_graph(target)
    assert inference.ExportedModel(target).input_shape == (None, SIZE, SIZE, 3)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(("scale", "said"), [(1.0, "outside 0..1"), (float("nan"), "NaN")])
def test_outputs_that_are_not_probabilities_are_refused(tmp_path, image, scale, said, error_line):
    """Mean-pixel output printed "PNEUMONIA (11459.28% confidence)"; NaN output "nan%"."""
    path = _mean_pixel(tmp_path / "m.onnx", scale=scale)
    assert predict.main([str(image), "--model", str(path)]) == 2
    line = error_line()
    assert said in line and "m.onnx" in line


def test_softmax_rows_must_sum_to_one():
    with pytest.raises(ModelFileError, match="summing to 1.5"):
        sidecar.check_probabilities(np.array([[0.5, 0.5, 0.5], [0.2, 0.3, 0.5]]), "m.onnx")
    ok = sidecar.check_probabilities(np.array([[0.2, 0.3, 0.5], [1.002, 0.0, 0.0]]), "m.onnx")
    assert ok.max() == 1.0


def test_evaluate_refuses_outputs_that_are_not_probabilities(tmp_path, image, error_line):


    data = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.open(image).save(data / cls / f"{cls}{i}.png")
    path = _mean_pixel(tmp_path / "m.onnx", scale=1.0)
    assert evaluate.main(["--model", str(path), "--data", str(data), "--n-boot", "10"]) == 2
    assert "outside 0..1" in error_line()


# --------------------------------------------------------------------------- sidecars


@pytest.mark.parametrize("value", [1e-300, 0.01, 21.0, 1e6])
def test_temperature_outside_its_bounds_is_refused(value):
    with pytest.raises(ModelFileError, match="temperature .* expected a number from 0.05 to 20"):
        validate_metadata({"temperature": value}, "sidecar s.json")
    validate_metadata({"temperature": 0.05})
    validate_metadata({"temperature": 20})


def test_deeply_nested_sidecar_is_one_line_not_recursion_error(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="nests arrays or objects 100000 deep"):
        read_sidecar(path)
    brackets = tmp_path / "strings.json"
    brackets.write_text(json.dumps({"threshold_rule": "[[[[" * 100, "threshold": 0.5}))
    assert read_sidecar(brackets)["threshold"] == 0.5


def test_oversized_sidecar_is_refused_before_parsing(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"threshold": 0.5, "notes": "x" * (2 * 2**20)}))
    with pytest.raises(ModelFileError, match="limit 1 MiB"):
        read_sidecar(path)


def test_sidecar_that_is_a_folder_is_an_error(tmp_path, image, error_line):
    path = _mean_pixel(tmp_path / "m.onnx", scale=1 / 255)
    (tmp_path / "m.json").mkdir()
    with pytest.raises(ModelFileError, match="is not a file"):
        read_sidecar(tmp_path / "m.json")
    assert predict.main([str(image), "--model", str(path)]) == 2
    assert "not a file" in error_line()


def test_sidecar_records_the_model_digest_and_refuses_another_models(tmp_path, error_line, image):
    """Another model's sidecar (its own threshold and classes) is refused with a one-line
    message; rewriting a field the fingerprint does not bind keeps it valid; a sidecar without
    a fingerprint is refused."""
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    saving.save_model(_tiny(0), first, {"threshold": 0.7})
    saving.save_model(_tiny(1), second, {"threshold": 0.2})
    meta = json.loads(saving.sidecar_path(first).read_text())
    assert meta["sha256"] == {"keras": files.file_digest(first)}
    write_json_atomic(saving.sidecar_path(first), {**meta, "notes": "edited later"})
    assert saving.load_model(first)[1]["threshold"] == 0.7

    swapped = json.loads(saving.sidecar_path(second).read_text())
    write_json_atomic(saving.sidecar_path(first), swapped)
    with pytest.raises(ModelFileError, match="does not match sidecar .*a.json.*another model"):
        saving.load_model(first)
    assert predict.main([str(image), "--model", str(first)]) == 2
    assert "another model" in error_line()

    write_json_atomic(saving.sidecar_path(first), {"threshold": 0.7})
    with pytest.raises(ModelFileError, match="has no sha256 and fingerprint field"):
        saving.load_model(first)


def test_export_sidecar_fingerprint_is_checked(tmp_path, image, error_line):
    path = _mean_pixel(tmp_path / "m.onnx", scale=1 / 255)
    other = _mean_pixel(tmp_path / "other.onnx", scale=1 / 512)
    write_json_atomic(path.with_suffix(".json"), sidecar.signed({}, {"onnx": files.file_digest(path)}))
    model, _ = inference.load_exported(path)
    assert model.output_units == 1
    write_json_atomic(path.with_suffix(".json"), sidecar.signed({}, {"onnx": files.file_digest(other)}))
    assert predict.main([str(image), "--model", str(path)]) == 2
    assert "another model" in error_line()
    write_json_atomic(path.with_suffix(".json"), sidecar.signed({}, {"keras": files.file_digest(other)}))
    with pytest.raises(ModelFileError, match="not of m.onnx"):
        inference.load_exported(path)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_an_empty_subtype_class(tmp_path, error_line):
    """bacterial_vs_viral on data without a viral image wrote bare NaN and recall 0.0."""


    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls, names in (("NORMAL", ["IM-0001-0001.jpeg"]),
                       ("PNEUMONIA", ["person1_bacteria_1.jpeg", "person2_bacteria_2.jpeg"])):
        (data / cls).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(data / cls / name)
    path = _mean_pixel(tmp_path / "m.onnx", scale=1 / 255)
    write_json_atomic(path.with_suffix(".json"),
                      sidecar.signed({"task": "bacterial_vs_viral"}, {"onnx": files.file_digest(path)}))
    assert evaluate.main(["--model", str(path), "--data", str(data), "--n-boot", "10"]) == 2
    line = error_line()
    assert "no images of VIRAL PNEUMONIA" in line and "bacterial_vs_viral" in line


def test_evaluate_json_is_strict():
    from pneumo_utils.evaluation.evaluate import strict_json

    value = {"auc": float("nan"), "ci": [np.float32("inf"), 0.5], "n": np.int64(3)}
    assert json.dumps(strict_json(value), allow_nan=False) == '{"auc": null, "ci": [null, 0.5], "n": 3}'
