"""The subtype tasks end to end on generated data: a softmax model learns the planted subtypes
(bacterial: one dense opacity; viral: two fainter ones, one in each lung), travels with a
three_class sidecar, and the predict and evaluate commands name its classes; a
bacterial-vs-viral model is evaluated on the PNEUMONIA images only; a binary model asked for
three classes, unlabelled file names and mismatched sidecars are refused in one line."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from synthetic import make_kermany_like

from pneumo_utils import sidecar
from pneumo_utils.data import pipelines, tasks
from pneumo_utils.data.kermany import load_kermany
from pneumo_utils.deploy import export, predict
from pneumo_utils.evaluation import evaluate, metrics
from pneumo_utils.explain import gradcam
from pneumo_utils.files import file_digest
from pneumo_utils.model import backbones, inference, saving
from pneumo_utils.sidecar import ModelFileError, signed

NAMES = tasks.TASKS["three_class"].class_names
SIZE = 48


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """48 NORMAL and 48 PNEUMONIA training images (half bacterial, half viral patients),
    8 + 8 for validation, 16 + 16 for test; viral files carry the viral pattern."""
    return make_kermany_like(tmp_path_factory.mktemp("three"), n_train_per_class=48, n_val_per_class=8,
                             n_test_per_class=16, image_size=64, seed=0, subtype_signal=True)


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A small scratch CNN with a three-unit softmax, trained on the three-class index, its
    evaluation, and the model saved with a three_class sidecar as the notebooks save it."""
    index = tasks.task_index(load_kermany(root), "three_class")
    split = {s: index[index["split"] == s] for s in ("train", "val", "test")}
    x = {s: pipelines.load_images(part["path"].tolist(), SIZE) for s, part in split.items()}
    y = {s: part["label"].to_numpy() for s, part in split.items()}
    model = backbones.build_scratch_cnn(SIZE, filters=(8, 16, 32), dense_units=32, dropout=0.2,
                                     conv_dropout=0.0, seed=0, n_classes=3)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")  # at 3e-3 some classes were never learnt
    model.fit(x["train"], y["train"], epochs=30, batch_size=16, shuffle=True, verbose=0,
              class_weight=pipelines.class_weights(y["train"]))
    proba = {s: model.predict(x[s], verbose=0) for s in ("val", "test")}
    evaluation = metrics.evaluation_report(y["test"], proba["test"], y["val"], proba["val"], n_boot=100,
                                            class_names=NAMES)
    path = tmp_path_factory.mktemp("models") / "three.keras"
    saving.save_model(model, path, saving.model_metadata(
        model, task="three_class", threshold=evaluation["threshold"],
        threshold_rule=evaluation["threshold_rule"], temperature=evaluation["temperature"]))
    return model, split, x, evaluation, path


def _tiny(n_classes: int) -> keras.Model:
    return backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=0, n_classes=n_classes)


def test_io_knows_the_class_names_of_every_task():
    assert sidecar.TASK_CLASS_NAMES == {name: task.class_names for name, task in tasks.TASKS.items()}


def test_softmax_model_learns_the_planted_subtypes(trained):
    model, split, _, evaluation, _ = trained
    assert model.get_layer("head_output").activation.__name__ == "softmax"
    test = evaluation["test"]
    assert test["class_counts"] == {name: int(n) for name, n in
                                    zip(NAMES, np.bincount(split["test"]["label"], minlength=3), strict=True)}
    assert test["auc"] > 0.85, f"macro one-vs-rest AUC {test['auc']:.3f} (chance 0.5)"
    assert min(test["auc_per_class"].values()) > 0.75, test["auc_per_class"]
    bacterial_vs_viral = np.array(test["confusion_matrix"])[1:, 1:]
    assert np.trace(bacterial_vs_viral) > 0.65 * bacterial_vs_viral.sum(), test["confusion_matrix"]
    assert evaluation["decision"] == "argmax" and evaluation["threshold"] is None
    assert test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]


def test_three_class_sidecar_round_trip(trained):
    model, split, x, evaluation, path = trained
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["task"], meta["class_names"], meta["output"], meta["decision"]) == (
        "three_class", list(NAMES), "softmax", "argmax")
    assert "threshold" not in meta and meta["temperature"] == evaluation["temperature"]
    loaded, loaded_meta = saving.load_model(path)
    proba = inference.predict_paths(loaded, split["test"]["path"].tolist())
    assert proba.shape == (len(split["test"]), 3)
    np.testing.assert_allclose(proba, model.predict(x["test"], verbose=0), atol=1e-4)


def test_predict_cli_names_one_of_the_three_classes(trained, capsys, tmp_path):
    _, split, _, _, path = trained
    viral = split["test"][split["test"]["label"] == 2]["path"].iloc[0]
    cam = tmp_path / "cam.png"
    assert predict.main([viral, "--model", str(path), "--gradcam", str(cam)]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    label = first.removeprefix("Prediction: ").split(" (")[0]
    assert label in NAMES and first.endswith("% confidence)")
    assert all(f"P({name}) = " in second for name in NAMES) and "argmax" in second
    assert cam.stat().st_size > 0
    assert predict.main([viral, "--model", str(path), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert list(result["probabilities"]) == list(NAMES) and result["decision"] == "argmax"
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert result["confidence"] == pytest.approx(result["probabilities"][result["label"]])
    assert result["label"] == NAMES[int(np.argmax(result["raw_output"]))]


def test_evaluate_cli_gives_a_three_by_three_confusion_matrix(trained, root, capsys, tmp_path, error_line):
    _, split, _, evaluation, path = trained
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(path), "--data", str(root), "--n-boot", "50", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["task"], result["class_names"], result["decision"]) == ("three_class", list(NAMES), "argmax")
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == len(split["test"]) == result["n"]
    assert result["auc"] == pytest.approx(evaluation["test"]["auc"], abs=1e-3)
    assert set(result["ci"]) == set(metrics.MULTICLASS_CI_METRICS)
    assert result["calibrated"]["temperature"] == evaluation["temperature"]
    capsys.readouterr()
    assert evaluate.main(["--model", str(path), "--data", str(root), "--cue-test"]) == 2
    assert "--cue-test" in error_line()
    assert evaluate.main(["--model", str(path), "--data", str(root), "--task", "pneumonia"]) == 2
    assert "trained for task three_class" in error_line()


def test_gradcam_explains_the_most_probable_class(trained):
    model, split, x, _, _ = trained
    images = x["test"][split["test"]["label"].to_numpy() > 0][:4]
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    heat = gradcam.grad_cam(model, images)
    for i, k in enumerate(predicted):
        np.testing.assert_allclose(heat[i], gradcam.grad_cam(model, images[i: i + 1], target=int(k))[0],
                                   atol=1e-5)
    other = gradcam.grad_cam(model, images[:1], target=int((predicted[0] + 1) % 3))
    assert not np.allclose(other, heat[:1])
    with pytest.raises(ValueError, match="class index 0..2"):
        gradcam.grad_cam(model, images, target="pneumonia")


def test_binary_model_asked_for_three_classes_exits_2(root, tmp_path, capsys, error_line):
    path = saving.save_model(_tiny(2), tmp_path / "binary.keras")
    assert evaluate.main(["--model", str(path), "--data", str(root), "--task", "three_class"]) == 2
    line = error_line()
    assert "trained for task pneumonia (classes NORMAL, PNEUMONIA)" in line
    assert "three_class (NORMAL, BACTERIAL PNEUMONIA, VIRAL PNEUMONIA)" in line


def test_sidecars_that_do_not_fit_the_model_are_refused(tmp_path, capsys, error_line):
    softmax, sigmoid = _tiny(3), _tiny(2)
    path = saving.save_model(softmax, tmp_path / "three.keras")
    sidecar = path.with_suffix(".json")
    good = json.loads(sidecar.read_text())
    assert good["task"] == "three_class" and saving.load_model(path)[1]["class_names"] == list(NAMES)
    cases = {
        "wrong names": ({**good, "class_names": ["NORMAL", "BACTERIA", "VIRUS"]},
                        r'field class_names is \["NORMAL", "BACTERIA", "VIRUS"\], expected \["NORMAL", '
                        r'"BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"\] \(the classes of task three_class'),
        "a threshold": ({**good, "threshold": 0.5}, "field threshold is 0.5, but task three_class"),
        "binary output": ({**good, "output": "sigmoid"}, 'field output is "sigmoid", expected "softmax"'),
        "binary task": ({**{k: v for k, v in good.items() if k not in ("output", "decision")},
                         "task": "pneumonia", "class_names": ["NORMAL", "PNEUMONIA"]},
                        "ends in 3 softmax units but sidecar .* says task pneumonia with 2 classes"),
        "no task": ({k: v for k, v in good.items() if k not in ("task", "class_names", "output", "decision")},
                    "ends in 3 softmax units but sidecar .* says no task"),
        "three names, no task": ({**{k: v for k, v in good.items() if k != "task"}},
                                 "expected two names .* when the sidecar names no task"),
    }
    picture = tmp_path / "x.png"
    keras.utils.save_img(picture, np.full((40, 40, 3), 120, np.uint8))
    for case, (meta, message) in cases.items():
        sidecar.write_text(json.dumps(signed(meta, good["sha256"])))  # the task checks speak
        with pytest.raises(ModelFileError, match=message):
            saving.load_model(path)
        assert predict.main([str(picture), "--model", str(path)]) == 2, case
        error_line()
    sidecar.unlink()
    with pytest.raises(ModelFileError, match="ends in 3 softmax units and has no sidecar"):
        saving.load_model(path)
    binary = saving.save_model(sigmoid, tmp_path / "binary.keras")
    other = signed(good, {"keras": file_digest(binary)})  # a valid fingerprint: the task check speaks
    binary.with_suffix(".json").write_text(json.dumps(other))
    with pytest.raises(ModelFileError, match="ends in one sigmoid unit .* says task three_class with 3 classes"):
        saving.load_model(binary)
    with pytest.raises(ModelFileError, match='field output is "sigmoid", expected "softmax" for task three_class'):
        saving.model_metadata(sigmoid, task="three_class")


@pytest.mark.parametrize(("fmt", "packages"), [("tflite", ("ai_edge_litert",)),
                                               ("onnx", ("tf2onnx", "onnxruntime"))])
def test_exported_softmax_model_predicts_three_probabilities(trained, root, tmp_path, capsys, fmt, packages):
    for package in packages:
        pytest.importorskip(package, reason="the export extra is not installed")
    model, split, x, _, path = trained
    target = path.with_name(export.export_model(path, fmt)["file"])
    exported, meta = inference.load_exported(target)
    assert exported.output_units == 3 and meta["task"] == "three_class"
    np.testing.assert_allclose(exported.predict(x["test"]), model.predict(x["test"], verbose=0),
                               atol=export.FP32_TOLERANCE)
    assert inference.predict_paths(exported, split["test"]["path"].tolist()[:5]).shape == (5, 3)
    assert evaluate.main(["--model", str(target), "--data", str(root), "--n-boot", "20"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["confusion_matrix"]).shape == (3, 3)
    alone = tmp_path / f"alone.{fmt}"
    alone.write_bytes(target.read_bytes())
    with pytest.raises(ModelFileError, match="ends in 3 softmax units and has no sidecar"):
        inference.load_exported(alone)


def test_bacterial_vs_viral_model_is_evaluated_on_pneumonia_images_only(root, tmp_path, capsys):
    model = _tiny(2)
    path = saving.save_model(model, tmp_path / "subtypes.keras",
                             saving.model_metadata(model, task="bacterial_vs_viral", threshold=0.5))
    assert evaluate.main(["--model", str(path), "--data", str(root), "--n-boot", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["task"], result["decision"]) == ("bacterial_vs_viral", "threshold")
    assert result["class_names"] == ["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"]
    assert result["n"] == 16 and result["n_positive"] == 8  # the 16 PNEUMONIA test images, 8 viral
    viral = next((root / "test" / "PNEUMONIA").glob("*virus*"))
    assert predict.main([str(viral), "--model", str(path)]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.split(" (")[0] in ("Prediction: BACTERIAL PNEUMONIA", "Prediction: VIRAL PNEUMONIA")
    assert second.startswith("P(VIRAL PNEUMONIA) = ")


def test_pneumonia_file_without_a_subtype_is_one_error_line(trained, root, tmp_path, capsys, error_line):
    *_, path = trained
    folder = tmp_path / "data"
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir(parents=True)
        for image in sorted((root / "test" / name).iterdir())[:2]:
            (folder / name / image.name).write_bytes(image.read_bytes())
    unnamed = next((root / "test" / "PNEUMONIA").iterdir()).read_bytes()
    (folder / "PNEUMONIA" / "scan_0001.jpeg").write_bytes(unnamed)
    assert evaluate.main(["--model", str(path), "--data", str(folder)]) == 2
    line = error_line()
    assert "scan_0001.jpeg" in line and "bacteria or virus" in line
