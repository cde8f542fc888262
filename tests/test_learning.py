"""End to end on generated data: a model really learns, Grad-CAM finds the planted signal,
the feature cache gives the same head as training over images, and predict/evaluate CLIs work."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from synthetic import SIGNAL_BOX, make_kermany_like

from pneumo_utils.data import pipelines, splits
from pneumo_utils.data.datasets import paths_and_labels
from pneumo_utils.data.kermany import load_kermany
from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import evaluate, metrics
from pneumo_utils.explain import gradcam
from pneumo_utils.model import backbones, features, inference, saving, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learn_root(tmp_path_factory):
    return make_kermany_like(tmp_path_factory.mktemp("learn"), n_train_per_class=40,
                             n_val_per_class=10, n_test_per_class=20, image_size=64, seed=1)


def _callbacks(patience: int) -> list:
    """The callbacks :func:`pneumo_utils.model.train.fit_head_on_features` trains with."""
    return [keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-6)]


@pytest.fixture(scope="module")
def trained(learn_root, tmp_path_factory):
    pipelines.set_seed(0)
    index = load_kermany(learn_root)
    split = {s: paths_and_labels(index, s) for s in ("train", "val", "test")}
    model = backbones.build_scratch_cnn(64, filters=(16, 32, 64), seed=0)
    train.compile_binary(model, 3e-3)
    ds = {s: pipelines.image_dataset(p, y, 64, 16, shuffle=(s == "train")) for s, (p, y) in split.items()}
    model.fit(ds["train"], validation_data=ds["val"], epochs=25, shuffle=False, verbose=0,
              class_weight=pipelines.class_weights(split["train"][1]), callbacks=_callbacks(patience=8))
    path = tmp_path_factory.mktemp("models") / "scratch.keras"
    proba_val = inference.predict_paths(model, split["val"][0])
    threshold = metrics.choose_threshold(split["val"][1], proba_val)
    saving.save_model(model, path, saving.model_metadata(model, backbone="scratch_cnn", threshold=threshold,
                                                         threshold_rule="youden on validation"))
    return model, split, path


def test_model_learns_the_planted_signal(trained):
    model, split, _ = trained
    paths, labels = split["test"]
    auc = roc_auc_score(labels, inference.predict_paths(model, paths))
    assert auc > 0.9, f"test AUC {auc:.3f} on separable synthetic data"


def _share_in_box(heat: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of a heat map's total mass inside ``box = (y0, x0, y1, x1)`` (image fractions)."""
    h, w = heat.shape
    y0, x0, y1, x1 = box
    inside = heat[int(y0 * h): int(np.ceil(y1 * h)), int(x0 * w): int(np.ceil(x1 * w))].sum()
    return float(inside / max(float(heat.sum()), 1e-12))


def test_gradcam_heat_concentrates_on_the_signal(trained):
    model, split, _ = trained
    paths, labels = split["test"]
    positives = [p for p, y in zip(paths, labels, strict=True) if y == 1][:10]
    heat = gradcam.grad_cam(model, pipelines.load_images(positives, 64), target="pneumonia")
    box_area = (SIGNAL_BOX[2] - SIGNAL_BOX[0]) * (SIGNAL_BOX[3] - SIGNAL_BOX[1])
    shares = [_share_in_box(h, SIGNAL_BOX) for h in heat]
    assert heat.shape[1:] == (16, 16) and heat.min() >= 0 and heat.max() <= 1
    assert np.median(shares) > 2 * box_area, f"heat share in box {np.median(shares):.2f} vs area {box_area:.2f}"
    picture = gradcam.overlay(pipelines.load_images(positives[:1], 64)[0], heat[0])
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_gradcam_finds_last_conv_layer_of_each_backbone():
    expected = {"densenet121": "relu", "resnet50": "conv5_block3_out", "mobilenet_v2": "out_relu"}
    for backbone, layer in expected.items():
        model = backbones.build_classifier(backbone, 32 if backbone != "resnet50" else 64, None)
        assert gradcam.find_last_conv_layer(model) == layer
        assert backbones.get_backbone(backbone).last_conv == layer
        heat = gradcam.grad_cam(model, np.full((1, *model.inputs[0].shape[1:]), 128.0, "float32"))
        assert heat.ndim == 3


def test_feature_cache_trains_the_same_head(learn_root, tmp_path):
    """Head on cached backbone features, or model.fit over images with the base frozen
    inside: the same trained model, up to float noise."""
    index = load_kermany(learn_root)
    paths, labels = splits.split_files(index)
    weights = pipelines.class_weights(labels["train"])
    results = {}
    for cached in (True, False):
        pipelines.set_seed(0)
        model = backbones.build_classifier("mobilenet_v2", 32, None, seed=0)
        if cached:
            feats = features.extract_split_features(model, paths, 16, cache_dir=tmp_path / "cache", verbose=False)
            train.fit_head_on_features(model, feats["train"], labels["train"], feats["val"], labels["val"],
                                       epochs=3, class_weight=weights, batch_size=16)
            head_proba = backbones.head_on_features(model).predict(feats["test"], verbose=0).reshape(-1)
        else:
            train.compile_binary(model)
            model.fit(pipelines.image_dataset(paths["train"], labels["train"], 32, 16, shuffle=True),
                      validation_data=pipelines.image_dataset(paths["val"], labels["val"], 32, 16), epochs=3,
                      class_weight=weights, shuffle=False, verbose=0, callbacks=_callbacks(patience=5))
        results[cached] = inference.predict_paths(model, paths["test"])
        if cached:
            np.testing.assert_allclose(head_proba, results[cached], atol=1e-4)
    np.testing.assert_allclose(results[True], results[False], atol=2e-3)


def test_label_smoothing_keeps_the_head_away_from_certainty():
    """Separable features: plain cross-entropy drives outputs to 0/1; smoothing 0.2 (targets
    0.1/0.9) keeps them clearly short of certainty."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = (rng.normal(0, 1, (200, 8)) + 4.0 * y[:, None]).astype("float32")
    extremes = {}
    for smoothing in (0.0, 0.2):
        pipelines.set_seed(0)
        model = backbones.build_classifier("mobilenet_v2", 32, None, seed=0)
        head = backbones.head_on_features(model)  # takes 1280 features: x padded with zeros
        padded = np.zeros((len(x), int(head.inputs[0].shape[-1])), "float32")
        padded[:, : x.shape[1]] = x
        train.fit_head_on_features(model, padded, y, padded, y, epochs=60, learning_rate=1e-2,
                                   patience=60, label_smoothing=smoothing)
        proba = head.predict(padded, verbose=0).reshape(-1)
        assert roc_auc_score(y, proba) > 0.99
        extremes[smoothing] = max(proba.max(), 1 - proba.min())
    assert extremes[0.0] > 0.999 and extremes[0.2] < 0.985, extremes


def test_feature_cache_is_reused_and_keyed_by_content(learn_root, tmp_path):
    index = load_kermany(learn_root)
    paths = index["path"].tolist()[:12]
    model = backbones.build_classifier("mobilenet_v2", 32, None, seed=0)
    first = features.extract_features(model, paths, cache_dir=tmp_path, verbose=False)
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1 and first.shape == (12, 1280)
    np.testing.assert_array_equal(features.extract_features(model, paths, cache_dir=tmp_path, verbose=False), first)
    assert sorted(tmp_path.glob("*.npy")) == files
    features.extract_features(model, paths[:-1], cache_dir=tmp_path, verbose=False)
    other = backbones.build_classifier("mobilenet_v2", 32, None, seed=1)
    features.extract_features(other, paths, cache_dir=tmp_path, verbose=False)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not list(tmp_path.glob(".*")), "no temporary file is left"


def test_predict_cli(trained, capsys, tmp_path):
    _, split, path = trained
    image = split["test"][0][-1]
    out = tmp_path / "cam.png"
    assert predict.main([image, "--model", str(path), "--gradcam", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Prediction: ") and "% confidence)" in printed
    assert out.is_file() and out.stat().st_size > 0


def test_predict_cli_bad_inputs_exit_2(trained, capsys, tmp_path):
    _, split, path = trained
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(open(split["test"][0][0], "rb").read()[:200])
    assert predict.main([str(broken), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpeg" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert predict.main([str(tmp_path / "none.png"), "--model", str(path)]) == 2
    not_model = tmp_path / "model.keras"
    not_model.write_text("x")
    assert predict.main([split["test"][0][0], "--model", str(not_model)]) == 2


def test_evaluate_cli_on_a_folder(trained, learn_root, tmp_path, capsys):
    _, _, path = trained
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(path), "--data", str(learn_root), "--out", str(out), "--n-boot", "50"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 40 and result["auc"] > 0.9
    assert set(result["ci"]) >= {"auc", "accuracy", "sensitivity", "specificity"}
    assert result["threshold_rule"] == "youden on validation"
    assert json.loads(capsys.readouterr().out)["auc"] == result["auc"]
    assert evaluate.main(["--model", str(path), "--data", str(learn_root / "test" / "NORMAL" / "nope")]) == 2
    capsys.readouterr()
    assert evaluate.main(["--model", str(path), "--data", str(learn_root), "--n-boot", "10", "--cue-test"]) == 0
    checked = json.loads(capsys.readouterr().out)
    cue = checked["cue_test"]
    assert list(cue) == ["clean", "histogram_swap", "border_swap", "border_mask"]
    assert cue["clean"]["auc"] == pytest.approx(result["auc"], abs=1e-3), "clean row = the plain evaluation"
    assert cue["clean"]["flipped"] == 0.0
    assert checked["selection_score"] == pytest.approx(min(row["balanced accuracy"] for row in cue.values()))
