"""Training with model.fit and Keras callbacks, and the files and tables a run leaves behind."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumo_utils.data import augment, pipelines, splits
from pneumo_utils.evaluation.metrics import evaluation_report, external_report
from pneumo_utils.explain import report
from pneumo_utils.model import backbones, saving, train


def _separable(n: int = 200, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(0, 1, (n, dim)).astype("float32")
    x[:, 0] += 3.0 * y
    return x, y.astype("float32")


def _dense_model(dim: int = 8) -> keras.Model:
    inputs = keras.Input((dim,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(4, activation="relu")(inputs))
    return keras.Model(inputs, outputs)


def test_fit_head_on_features_stops_early_and_ends_at_the_best_validation_epoch():
    x, y = _separable()
    x_val, y_val = _separable(seed=1)
    model = backbones.build_classifier("mobilenet_v2", 32, None, seed=0)
    head = backbones.head_on_features(model)
    width = int(head.inputs[0].shape[-1])
    padded, padded_val = (np.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in (x, x_val))
    history = train.fit_head_on_features(model, padded, y, padded_val, y_val, epochs=200, patience=2,
                                         learning_rate=1e-2, seed=0)
    assert len(history["loss"]) < 200, "early stopping never fired on a problem learned in a few epochs"
    assert set(history) >= {"loss", "auc", "val_loss", "val_auc", "learning_rate"}
    restored = roc_auc_score(y_val, head.predict(padded_val, verbose=0).reshape(-1))
    assert restored == pytest.approx(max(history["val_auc"]), abs=0.01)


def test_fit_head_on_features_learns_and_trains_the_full_models_head():
    x, y = _separable()
    model = backbones.build_classifier("mobilenet_v2", 32, None, seed=0)
    head = backbones.head_on_features(model)  # 1280 features in: x padded with zeros
    padded = np.zeros((len(x), int(head.inputs[0].shape[-1])), "float32")
    padded[:, : x.shape[1]] = x
    before = model.get_layer("head_output").get_weights()[0].copy()
    history = train.fit_head_on_features(model, padded, y, padded, y, epochs=20, learning_rate=1e-2,
                                         class_weight=pipelines.class_weights(y), seed=0)
    assert max(history["val_auc"]) > 0.95
    assert not np.allclose(model.get_layer("head_output").get_weights()[0], before)
    assert roc_auc_score(y, head.predict(padded, verbose=0).reshape(-1)) > 0.95


@pytest.mark.slow
def test_fine_tuning_on_augmented_images_moves_only_the_unfrozen_layers(kermany_root):
    index = splits.kermany_split(kermany_root, val_fraction=0.25, seed=0)
    paths, labels = splits.split_files(index)
    model = backbones.build_scratch_cnn(32, filters=(4, 8), dense_units=8, seed=0)
    layers = backbones.base_layers(model)
    for i, layer in enumerate(layers):  # the top 4 trainable, BatchNormalization frozen (notebook 03)
        layer.trainable = i >= len(layers) - 4 and not isinstance(layer, keras.layers.BatchNormalization)
    n_trainable = sum(layer.trainable for layer in layers)
    frozen = {layer.name: [w.copy() for w in layer.get_weights()] for layer in layers if not layer.trainable}
    tuned = {layer.name: [w.copy() for w in layer.get_weights()] for layer in layers if layer.trainable}
    assert len(tuned) == n_trainable and all(not isinstance(model.get_layer(n), keras.layers.BatchNormalization)
                                             for n in tuned)
    train_ds, steps = augment.training_dataset(paths["train"], labels["train"], 32, batch_size=8,
                                               layers=augment.augmentation(seed=0), images_per_epoch=16)
    val_ds = pipelines.image_dataset(paths["val"], labels["val"], 32, batch_size=8)
    train.compile_binary(model, learning_rate=1e-2)
    history = model.fit(train_ds, validation_data=val_ds, epochs=2, steps_per_epoch=steps, shuffle=False,
                        class_weight=pipelines.class_weights(labels["train"]), verbose=0)
    assert len(history.history["val_auc"]) == 2
    for name, weights in frozen.items():  # BatchNorm moving statistics included
        for now, before in zip(model.get_layer(name).get_weights(), weights, strict=True):
            np.testing.assert_array_equal(now, before)
    assert any(not np.allclose(now, before) for name, weights in tuned.items()
               for now, before in zip(model.get_layer(name).get_weights(), weights, strict=True))


def _evaluation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 20)
    proba = np.clip(y * 0.5 + rng.random(40) * 0.5, 0, 1)
    return evaluation_report(y_test=y, proba_test=proba, y_val=y, proba_val=proba, n_boot=20)


def test_save_run_writes_model_sidecar_card_and_metrics_with_the_tasks_class_names(tmp_path):
    evaluation = _evaluation()
    model = backbones.build_scratch_cnn(32, filters=(4, 8), dense_units=8, seed=0)
    path = tmp_path / "m.keras"
    (meta,) = report.save_run(
        [report.TrainedModel(model, path, name="cnn", backbone="scratch_cnn", weights=report.describe_weights(None),
                             positive_class="EFFUSION", evaluation=evaluation, facts={"training": "test run"})],
        metrics_path=tmp_path / "run.metrics.json", run_name="run", title="t", data="d", task=None,
        class_names=["NO FINDING", "EFFUSION"], data_set="nih:EFFUSION", distribution={"strategy": "default"},
    )
    _, sidecar = saving.load_model(path)
    assert sidecar == {k: v for k, v in json.loads(path.with_suffix(".json").read_text()).items()}
    assert sidecar["threshold"] == pytest.approx(evaluation["threshold"]) and "task" not in sidecar
    assert sidecar["class_names"] == ["NO FINDING", "EFFUSION"] and meta["weights"] == "random initialisation"
    assert sidecar["metrics"]["test"]["auc"] == pytest.approx(evaluation["test"]["auc"])
    assert sidecar["training"] == "test run" and sidecar["distribution"] == {"strategy": "default"}
    card = path.with_suffix(".md").read_text()
    assert "P(EFFUSION)" in card and "NO FINDING" in card and "test run" in card
    assert "Not for diagnostic use" in card
    record = json.loads((tmp_path / "run.metrics.json").read_text())
    assert record["task"] == "nih:EFFUSION" and record["class_names"] == ["NO FINDING", "EFFUSION"]
    (entry,) = record["models"]
    assert entry["training"] == "test run" and entry["model_path"] == str(path) and "task" not in entry


def test_save_run_metrics_carry_what_the_index_shows_for_several_models(tmp_path):
    trained = [
        report.TrainedModel(backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=i), tmp_path / f"m{i}.keras",
                            name=f"model {i}", backbone="resnet50", weights=report.describe_weights(w),
                            positive_class="PNEUMONIA", evaluation=_evaluation(seed=i), facts={"selection_score": i})
        for i, w in ((0, None), (1, "/w/resnet50_notop.h5"))
    ]
    y = np.array([0, 1] * 20)
    trained[0].evaluation["external"] = external_report(y, np.linspace(0, 1, 40), threshold=0.5, data="site A",
                                                        n_boot=20)
    metas = report.save_run(trained, metrics_path=tmp_path / "run.metrics.json", run_name="run", title="t", data="d")
    assert [m["task"] for m in metas] == ["pneumonia", "pneumonia"]
    assert "roc" not in metas[0]["metrics"]["external"] and metas[0]["metrics"]["external"]["data"] == "site A"
    record = json.loads((tmp_path / "run.metrics.json").read_text())
    entries = record["models"]
    for entry in entries:
        assert {"name", "backbone", "weights", "positive_class", "threshold", "threshold_rule",
                "validation", "test", "model_path", "val_auc", "selection_score"} <= set(entry)
    assert entries[1]["weights"] == "ImageNet (resnet50_notop.h5)"
    assert entries[0]["roc"] == trained[0].evaluation["roc"] and entries[0]["external"]["roc"]["fpr"]
    best = max(entries, key=lambda e: e["val_auc"])
    assert record["task"] == "kermany" and record["model_path"] == best["model_path"]
    assert record["weights"] == best["weights"] and len(entries) == 2
    assert all(saving.load_model(t.path)[1]["selection_score"] == i for i, t in enumerate(trained))


def test_tables_and_captions_for_the_report():
    evaluation = _evaluation()
    table = report.comparison_table({"a": evaluation, "b": evaluation})
    assert list(table.columns) == ["a", "b"]
    assert table.loc["auc", "a"].count("(") == 1 and "threshold (from validation)" in table.index

    labels = np.array([0, 0, 1, 1, 1])
    proba = np.array([0.1, 0.7, 0.9, 0.2, 0.8])
    rows, captions = report.pick_examples(labels=labels, proba=proba, threshold=0.5, n_correct=2, n_wrong=5)
    assert len(rows) == 4 and sorted(rows[2:]) == [1, 3]  # only two wrong predictions exist
    assert captions[2].startswith("WRONG: true ")
    names = ("NO FINDING", "EFFUSION")
    captions = report.prediction_captions(labels=labels, rows=[0, 3], class_names=names,
                                          predictions={"a": (proba, 0.5), "b": (1 - proba, 0.5)})
    assert captions[0] == "true NO FINDING\na: p=0.10 ok\nb: p=0.90 WRONG"


def test_describe_split_counts_images_positives_and_patients(kermany_root):
    index = splits.kermany_split(kermany_root, val_fraction=0.25, seed=0)
    sentence = report.describe_split(index, class_names=("NO FINDING", "EFFUSION"))
    train_part = index[index["split"] == "train"]
    assert sentence.startswith(f"train: {len(train_part)} images ({int(train_part['label'].sum())} EFFUSION) "
                               f"from {train_part['patient'].nunique()} patients")
    assert sentence.count(";") == 2
