"""Backbone building, weights resolution, preprocessing, and the saved-model contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils.model import backbones, inference, saving


@pytest.fixture(scope="module")
def small_model():
    return backbones.build_classifier("mobilenet_v2", image_size=48, weights=None, seed=0)


def test_flat_classifier_has_head_and_frozen_base(small_model):
    names = [layer.name for layer in small_model.layers]
    assert names[-4:] == ["head_gap", "head_dense", "head_dropout", "head_output"]
    assert small_model.get_layer("head_dense").units == 128
    assert small_model.get_layer("head_dropout").rate == 0.5
    assert not any(layer.trainable for layer in backbones.base_layers(small_model))
    assert small_model.output.shape[-1] == 1


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
    ],
)
def test_preprocess_layer_matches_keras_applications(mode, reference):
    inputs = keras.Input((8, 8, 3))
    layer_model = keras.Model(inputs, backbones.preprocessing_layer(inputs, mode))
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = layer_model.predict(x, verbose=0)
    np.testing.assert_allclose(ours, reference(x.copy()), rtol=1e-5, atol=1e-4)
    assert not any(w.trainable for w in layer_model.weights)


def test_saved_model_loads_with_plain_keras(tmp_path):
    """A saved classifier (caffe preprocessing: the channel flip) loads in a fresh
    interpreter with keras.models.load_model alone, pneumo_utils never imported, and
    predicts what the original predicts."""
    model = backbones.build_classifier("resnet50", image_size=32, weights=None, seed=0)
    path = saving.save_model(model, tmp_path / "resnet.keras")
    code = (
        "import sys, keras, numpy as np; model = keras.models.load_model(sys.argv[1]);"
        "x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype('float32');"
        "np.save(sys.argv[2], model.predict(x, verbose=0));"
        "assert not [m for m in sys.modules if m.startswith('pneumo_utils')]"
    )
    out = tmp_path / "out.npy"
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, cwd=tmp_path,
                   capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.load(out), model.predict(x, verbose=0), atol=1e-5)


def test_resolve_weights_from_folder(tmp_path, monkeypatch):
    spec = backbones.get_backbone("resnet50")
    (tmp_path / spec.weights_file).write_bytes(b"weights")
    monkeypatch.setenv("PNEUMO_WEIGHTS_DIR", str(tmp_path))
    assert backbones.resolve_weights("resnet50", "imagenet") == str(tmp_path / spec.weights_file)
    assert backbones.resolve_weights("resnet50", None) is None
    assert backbones.resolve_weights("resnet50", "none") is None
    assert backbones.resolve_weights("ResNet-50".replace("-", ""), str(tmp_path / spec.weights_file))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbones.resolve_weights("resnet50", tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.resolve_weights("vgg16", "imagenet")


def test_offline_without_weights_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(backbones.WeightsNotFoundError, match="PNEUMO_WEIGHTS_DIR"):
        backbones.resolve_weights("densenet121", "imagenet")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert backbones.resolve_weights("densenet121", "imagenet", fallback="random") is None


def test_shared_imagenet_weights_load_into_the_flat_model(shared_dir):
    weights = shared_dir / "weights" / backbones.get_backbone("mobilenet_v2").weights_file
    model = backbones.build_classifier("mobilenet_v2", 96, str(weights))
    reference = keras.applications.MobileNetV2(include_top=False, weights=str(weights),
                                               input_shape=(96, 96, 3), pooling="avg")
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    ours = backbones.pooled_features_model(model).predict(x, verbose=0)
    ref = reference.predict(keras.applications.mobilenet_v2.preprocess_input(x.copy()), verbose=0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_save_and_load_round_trip_with_sidecar(small_model, tmp_path):
    path = tmp_path / "m.keras"
    meta = saving.model_metadata(small_model, backbone="mobilenet_v2", threshold=0.37)
    saving.save_model(small_model, path, meta)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"
    loaded, loaded_meta = saving.load_model(path)
    assert loaded_meta["threshold"] == 0.37 and loaded_meta["image_size"] == 48
    assert json.loads(saving.sidecar_path(path).read_text())["backbone"] == "mobilenet_v2"
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), small_model.predict(x, verbose=0), atol=1e-6)


def test_not_a_model_file_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(saving.ModelFileError, match="not a Keras .keras model"):
        saving.load_model(text)
    pickle_like = tmp_path / "model.pkl"
    pickle_like.write_bytes(b"\x80\x04")
    with pytest.raises(saving.ModelFileError):
        saving.load_model(pickle_like)
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("config.json", "{not json")
    with pytest.raises(saving.ModelFileError, match="cannot load"):
        saving.load_model(broken)
    with pytest.raises(FileNotFoundError):
        saving.load_model(tmp_path / "absent.keras")


def test_progress_is_one_closing_line_per_pass_and_never_a_bar(tmp_path, capsys):
    """With verbose=True, batch prediction (on stderr) and feature extraction print Keras'
    closing line of each pass (batches, seconds, time per batch; ``verbose=2``) and no
    carriage-return bar, so a notebook's HTML report keeps one line however many batches run;
    with verbose=False they print nothing."""
    from pneumo_utils.model import features

    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 40), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    model = backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=0)
    inference.predict_paths(model, paths, batch_size=2)
    features.extract_features(model, paths, batch_size=2, cache_dir=None, verbose=False)
    quiet = capsys.readouterr()  # stderr may hold TensorFlow's own log lines, never a bar
    assert not quiet.out and "\r" not in quiet.err and "it/s" not in quiet.err

    inference.predict_paths(model, paths, batch_size=1, verbose=True)  # 5 batches each
    features.extract_features(model, paths, batch_size=1, cache_dir=None, verbose=True)
    captured = capsys.readouterr()  # predict_paths on stderr: a command's stdout may be JSON
    assert "\r" not in captured.out + captured.err and "\b" not in captured.out + captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("5/5 - ")]
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("5/5 - ") and lines[1].startswith("features: computed (5, 4)")


def test_builders_end_in_a_softmax_for_three_classes():
    """n_classes=3 gives a three-unit softmax head (head_on_features included), 2 today's
    sigmoid unit; the sidecar metadata follows the output."""
    three = backbones.build_classifier("mobilenet_v2", image_size=32, weights=None, seed=0, n_classes=3)
    assert three.output.shape[-1] == 3 and saving.output_kind(three) == ("softmax", 3)
    head = backbones.head_on_features(three)
    proba = head.predict(np.random.default_rng(0).normal(size=(4, head.inputs[0].shape[-1])), verbose=0)
    assert proba.shape == (4, 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    meta = saving.model_metadata(three, threshold=None, threshold_rule="argmax")
    assert (meta["task"], meta["output"], meta["decision"]) == ("three_class", "softmax", "argmax")
    assert "threshold" not in meta and len(meta["class_names"]) == 3
    scratch = backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=0, n_classes=2)
    assert saving.output_kind(scratch) == ("sigmoid", 1)
    binary = saving.model_metadata(scratch)
    assert (binary["task"], binary["output"], binary["decision"], binary["threshold"]) == (
        "pneumonia", "sigmoid", "threshold", 0.5)
    subtypes = saving.model_metadata(scratch, class_names=["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"])
    assert subtypes["task"] == "bacterial_vs_viral"
    assert "task" not in saving.model_metadata(scratch, class_names=["No Finding", "Effusion"])
    with pytest.raises(ValueError, match="n_classes must be 2 or more"):
        backbones.build_scratch_cnn(32, filters=(4,), n_classes=1)
