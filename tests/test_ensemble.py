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


def test_an_ensemble_is_checked_through_its_first_member_with_pooled_features(members, kermany_root):
    from pneumo_utils.model import input_check

    model = ensemble.average(members[::-1], image_size=64)  # first member: b, 48 px
    paths = [str(p) for p in sorted((kermany_root / "train" / "NORMAL").iterdir())[:24]]
    proba, looks = input_check.predict_with_looks(model, paths, batch_size=8)
    np.testing.assert_allclose(proba, inference.predict_paths(model, paths, 8), rtol=1e-5, atol=1e-6)
    from pneumo_utils.data.pipelines import load_images

    resized = tf.image.resize(load_images(paths, 64).astype("float32"), (48, 48)).numpy()
    pooled = keras.Model(members[1].inputs, members[1].get_layer("head_gap").output).predict(resized, verbose=0)
    np.testing.assert_allclose(looks.features, pooled, rtol=1e-4, atol=1e-5)
    assert looks.features.shape == (24, members[1].get_layer("head_gap").output.shape[-1])
    check = input_check.fit(model, paths[:16], paths[16:], components={"features": 2, "thumbnail": 2}, seed=0)
    assert check.limits and np.isfinite(list(check.limits.values())).all()


def test_an_ensemble_is_kept_only_when_it_ranks_better_than_every_member():
    from pneumo_utils.evaluation.ensemble import against_members

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = np.array([0.1, 0.2, 0.6, 0.3, 0.5, 0.7, 0.8, 0.9])  # one negative ranked above a positive
    b = np.array([0.1, 0.7, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])  # another one
    table, keep = against_members(labels, {"a": a, "b": b}, (a + b) / 2)
    assert keep and table.loc["ensemble", "auc"] == 1.0 and table.loc["a", "auc"] < 1.0
    strong, weak = labels * 0.8 + 0.1, np.array([0.9, 0.8, 0.95, 0.7, 0.05, 0.3, 0.1, 0.2])  # weak: inverted
    table, keep = against_members(labels, {"strong": strong, "weak": weak}, (strong + weak) / 2)
    assert not keep and table.loc["strong", "auc"] == 1.0 > table.loc["ensemble", "auc"]
    three = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.7 + 0.1
    table, keep = against_members(np.array([0, 1, 2, 0, 1, 2]), {"x": three, "y": three}, three)
    assert not keep and table.loc["ensemble", "auc"] == table.loc["x", "auc"] == 1.0
    with pytest.raises(ValueError, match="at least two members"):
        against_members(labels, {"a": a}, a)


def test_saved_members_are_loaded_renamed_and_missing_ones_named(members, tmp_path):
    path = tmp_path / "03_run.keras"
    saving.save_model(members[0], path, saving.model_metadata(members[0], threshold=0.5, threshold_rule="fixed 0.5"))
    loaded = ensemble.load_members(["resnet50", "03_run"], tmp_path, own=("resnet50",))
    assert list(loaded) == ["03_run"] and loaded["03_run"][0].name == "saved_03_run"
    assert loaded["03_run"][1]["threshold"] == 0.5
    assert ensemble.load_members([], tmp_path) == {}
    with pytest.raises(FileNotFoundError, match=r"not_there\.keras.*run the notebooks that save them first"):
        ensemble.load_members(["03_run", "not_there"], tmp_path)
    with pytest.raises(ValueError, match="at least two different members"):
        ensemble.load_members(["03_run", "03_run"], tmp_path)
