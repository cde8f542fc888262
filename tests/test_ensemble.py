"""An ensemble of classifiers saved as one .keras model: its output is the members' mean, it
saves and loads like any model, predict and evaluate take it, Grad-CAM explains it with the
members' maps, and members that cannot be averaged are refused."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import evaluate
from pneumo_utils.explain import gradcam
from pneumo_utils.model import backbones, ensemble, inference, saving


def _member(size: int, seed: int, name: str) -> keras.Model:
    model = backbones.build_scratch_cnn(size, filters=(4, 8), dense_units=8, seed=seed)
    model.name = name
    return model


@pytest.fixture(scope="module")
def members() -> list[keras.Model]:
    return [_member(64, 0, "a"), _member(48, 1, "b")]


def test_ensemble_output_is_the_mean_of_its_members(members):
    model = ensemble.average(members, image_size=64)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    expected = (members[0].predict(x, verbose=0)
                + members[1].predict(tf.image.resize(x, (48, 48)).numpy(), verbose=0)) / 2
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert ensemble.members_of(model) == members and ensemble.members_of(members[0]) == []


def test_saved_ensemble_predicts_evaluates_and_explains(members, kermany_root, tmp_path, capsys):
    model = ensemble.average(members, image_size=64)
    path = tmp_path / "ensemble.keras"
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5, threshold_rule="fixed 0.5",
                                                        backbone="ensemble of a, b"))
    loaded, meta = saving.load_model(path)
    image = sorted((kermany_root / "test" / "NORMAL").iterdir())[0]
    x = inference.predict_paths(loaded, [str(image)])
    np.testing.assert_allclose(x, inference.predict_paths(model, [str(image)]), rtol=1e-5)
    assert predict.main([str(image), "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["probability"] == pytest.approx(float(x[0]), abs=1e-4)
    assert evaluate.main(["--model", str(path), "--data", str(kermany_root), "--n-boot", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] > 0
    images = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    heat = gradcam.grad_cam(loaded, images, threshold=0.5)
    assert heat.shape[0] == 3 and heat.ndim == 3 and 0 <= heat.min() and heat.max() <= 1


def test_members_that_cannot_be_averaged_are_refused(members):
    with pytest.raises(ValueError, match="at least two members"):
        ensemble.average(members[:1], image_size=64)
    three = backbones.build_scratch_cnn(64, filters=(4,), dense_units=4, seed=0, n_classes=3)
    with pytest.raises(ValueError, match="different outputs"):
        ensemble.average([members[0], three], image_size=64)
    with pytest.raises(ValueError, match="names must differ"):
        ensemble.average([members[0], members[0]], image_size=64)
