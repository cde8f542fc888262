"""The sidecar's fingerprint binds the model file to the fields that say what its output means:
an edited task or class names, a deleted digest or fingerprint, a changed threshold are refused
by load_model, predict and calibrate; save, export and calibrate write a valid one."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils.deploy import predict as predict_command
from pneumo_utils.evaluation import calibrate as calibrate_command
from pneumo_utils.model import backbones, saving
from pneumo_utils.sidecar import ModelFileError, check_fingerprint, fingerprint, signed

SIZE = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny pneumonia model saved with its sidecar."""
    model = backbones.build_scratch_cnn(SIZE, filters=(4,), dense_units=4, seed=0)
    path = tmp_path_factory.mktemp("fingerprint") / "tiny.keras"
    saving.save_model(model, path, saving.model_metadata(model, task="pneumonia"))
    return path


def _image(folder: Path) -> Path:
    path = folder / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE), np.uint8)).save(path)
    return path


def _edited(saved: Path, folder: Path, change) -> Path:
    """A byte copy of ``saved`` whose sidecar is ``change(sidecar)``, written by hand."""
    copy = folder / "copy.keras"
    copy.write_bytes(saved.read_bytes())
    meta = json.loads(saving.sidecar_path(saved).read_text())
    change(meta)
    saving.sidecar_path(copy).write_text(json.dumps(meta))
    return copy


def test_saved_sidecar_carries_a_fingerprint_that_loads(saved):
    meta = json.loads(saving.sidecar_path(saved).read_text())
    assert meta["fingerprint"] == fingerprint(meta) and len(meta["fingerprint"]) == 64
    _, loaded = saving.load_model(saved)
    assert loaded["task"] == "pneumonia"


def _to_viral(meta: dict) -> None:
    meta.update(task="bacterial_vs_viral", class_names=["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"])


@pytest.mark.parametrize("change, message", [
    (_to_viral, "does not match its fingerprint"),
    (lambda m: m.update(threshold=0.01), "does not match its fingerprint"),
    (lambda m: m.pop("threshold"), "does not match its fingerprint"),
    (lambda m: m.pop("sha256"), "has no sha256 field"),
    (lambda m: m.pop("fingerprint"), "has no fingerprint field"),
])
def test_edited_or_unsigned_sidecar_is_refused(saved, tmp_path, change, message):
    copy = _edited(saved, tmp_path, change)
    with pytest.raises(ModelFileError, match=message) as caught:
        saving.load_model(copy)
    assert "again" in str(caught.value)


def test_predict_refuses_an_edited_task_in_one_line(saved, tmp_path, error_line):
    copy = _edited(saved, tmp_path, _to_viral)
    assert predict_command.main([str(_image(tmp_path)), "--model", str(copy)]) == 2
    line = error_line()
    assert "fingerprint" in line and "VIRAL" not in line


def test_calibrate_refuses_an_edited_task(saved, tmp_path, error_line):
    copy = _edited(saved, tmp_path, _to_viral)
    site = tmp_path / "site"
    for name in ("NORMAL", "PNEUMONIA"):
        (site / name).mkdir(parents=True)
    assert calibrate_command.main(["--model", str(copy), "--data", str(site),
                                   "--out", str(tmp_path / "out.keras")]) == 2
    assert "fingerprint" in error_line()


def test_signed_sidecar_of_another_digest_kind_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx bytes")
    meta = signed({"task": "pneumonia"}, {"keras": "0" * 64})
    with pytest.raises(ModelFileError, match="not of m.onnx"):
        check_fingerprint(meta, model, "sidecar m.json")


def test_fingerprint_reads_numpy_values_as_json_numbers():
    meta = signed({"threshold": np.float32(0.25), "image_size": np.int64(64)}, {"keras": "a" * 64})
    assert meta["threshold"] == 0.25 and type(meta["image_size"]) is int
    assert fingerprint(json.loads(json.dumps(meta))) == meta["fingerprint"]


@pytest.mark.slow
def test_onnx_export_of_an_edited_sidecar_is_refused(saved, tmp_path, error_line):
    pytest.importorskip("tf2onnx")
    from pneumo_utils.deploy import export

    copy = tmp_path / "tiny.keras"
    copy.write_bytes(saved.read_bytes())
    saving.sidecar_path(copy).write_text(saving.sidecar_path(saved).read_text())
    export.export_model(copy, "onnx")
    meta = json.loads(saving.sidecar_path(copy).read_text())
    assert set(meta["sha256"]) == {"keras", "onnx"} and meta["fingerprint"] == fingerprint(meta)
    onnx = copy.with_suffix(".onnx")
    image = _image(tmp_path)
    assert predict_command.main([str(image), "--model", str(onnx)]) == 0
    _to_viral(meta)
    saving.sidecar_path(copy).write_text(json.dumps(meta))
    assert predict_command.main([str(image), "--model", str(onnx)]) == 2
    assert "fingerprint" in error_line()


def test_keras_model_saved_without_pneumo_keeps_inferred_metadata(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "plain.keras"
    keras.Model(inputs, outputs).save(path)
    _, meta = saving.load_model(path)
    assert meta["task"] == "pneumonia" and meta["threshold"] == 0.5
