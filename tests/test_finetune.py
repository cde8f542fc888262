"""Training over images, the two-phase recipe and the shared notebook steps (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_utils import augment, finetune, models, workflow


@pytest.fixture(scope="module")
def split(kermany_root):
    index = workflow.kermany_split(kermany_root, val_fraction=0.25, seed=0)
    paths, labels = workflow.split_files(index)
    return index, paths, labels


def _tiny(seed=0):
    return models.build_scratch_cnn(32, filters=(4, 8), dense_units=8, seed=seed)


def test_split_files_matches_the_index(split):
    index, paths, labels = split
    assert set(paths) == {"train", "val", "test"}
    for name in paths:
        part = index[index["split"] == name]
        assert paths[name] == part["path"].tolist()
        np.testing.assert_array_equal(labels[name], part["label"].to_numpy())
        assert set(labels[name]) == {0, 1}


@pytest.mark.slow
def test_train_on_images_from_scratch_and_fine_tune(split, tmp_path):
    _, paths, labels = split
    model = _tiny()
    history, proba_val = finetune.train_on_images(
        model, paths, labels, epochs=2, learning_rate=1e-3, batch_size=8,
        augment_layers=augment.augmentation(seed=0), images_per_epoch=8, seed=0,
        history_path=tmp_path / "h.json", verbose=0,
    )
    assert len(history["loss"]) == 2 and len(history["val_auc"]) == 2
    assert {"auc", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert json.loads((tmp_path / "h.json").read_text())["epoch"] == [0, 1]
    # the returned validation predictions are those of the restored (best) epoch
    best = int(np.argmax(history["val_auc"]))
    np.testing.assert_allclose(proba_val, models.predict_paths(model, paths["val"]), atol=1e-5)
    assert finetune.validation_metrics(labels["val"], proba_val)["auc"] == history["val_auc"][best]
    proba = finetune.predict_splits(model, paths, batch_size=8)
    assert set(proba) == {"val", "test"}
    assert proba["test"].shape == (len(paths["test"]),)

    # fine-tuning: only the top layers (BatchNorm excluded) become trainable
    history, _ = finetune.train_on_images(model, paths, labels, 1, 1e-5, unfreeze_layers=4,
                                       initial_epoch=2, batch_size=8, verbose=0)
    assert history["epoch"] == [2]
    trainable = [layer.name for layer in models.base_layers(model) if layer.trainable]
    assert trainable == [layer.name for layer in models.base_layers(model)[-4:]
                         if "_bn" not in layer.name]
    assert finetune.trainable_backbone_layers(model) == len(trainable)


def test_keep_best_restores_the_better_phase():
    model = _tiny()
    y_val = np.array([0, 0, 1, 1])
    good = {"val": np.array([0.1, 0.2, 0.8, 0.9])}
    bad = {"val": np.array([0.9, 0.2, 0.8, 0.1])}
    first = finetune.snapshot(model, "1", good, epochs=3)
    original = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in original])
    second = finetune.snapshot(model, "2", bad, epochs=1)
    kept, table = finetune.keep_best(model, y_val, [first, second])
    assert set(kept.proba) == {"val"}  # nothing to complete without paths
    assert kept.name == "1" and table["kept"].tolist() == ["yes", ""]
    assert table.loc["1", "validation AUC"] == 1.0 and table.loc["1", "epochs"] == 3
    for now, before in zip(model.get_weights(), original, strict=True):
        np.testing.assert_array_equal(now, before)
    # a tie keeps the earlier phase
    tie = finetune.compare_phases(y_val, [first, finetune.Phase("2", [], good)])
    assert tie["kept"].tolist() == ["yes", ""]


@pytest.mark.slow
def test_two_phase_runs_both_phases(split, tmp_path):
    _, paths, labels = split
    model = _tiny(seed=1)
    result = finetune.two_phase(
        model, paths, labels, epochs=2, fine_tune_epochs=1, unfreeze_layers=4,
        augment_layers=augment.augmentation(seed=0), batch_size=8, patience=2,
        cache_dir=tmp_path / "features", seed=0, verbose=0,
    )
    phases = result.history["phase"]
    assert phases[0] == 1 and phases[-1] == 2 and len(phases) == len(result.history["loss"])
    assert list(result.table.index) == ["1: frozen base, head only", "2: top 4 layers fine-tuned"]
    assert (result.table["kept"] == "yes").sum() == 1
    assert set(result.proba) >= {"val", "test"}
    for name in ("val", "test"):
        np.testing.assert_allclose(models.predict_paths(model, paths[name]), result.proba[name], atol=1e-4)

    only_head = finetune.two_phase(_tiny(seed=2), paths, labels, epochs=1, fine_tune_epochs=0,
                                   batch_size=8, cache_dir=None, verbose=0)
    assert len(only_head.table) == 1 and set(only_head.history["phase"]) == {1}


def test_save_with_card_and_comparison_table(tmp_path):
    from pneumo_utils.evaluate import evaluation_report

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    proba = np.clip(y * 0.5 + rng.random(40) * 0.5, 0, 1)
    evaluation = evaluation_report(y, proba, y, proba, n_boot=20)
    model = _tiny()
    meta = workflow.save_with_card(model, tmp_path / "m.keras", evaluation, backbone="scratch_cnn",
                                   training="test run")
    assert (tmp_path / "m.keras").is_file() and (tmp_path / "m.md").is_file()
    loaded, sidecar = models.load_model(tmp_path / "m.keras")
    assert sidecar["threshold"] == pytest.approx(evaluation["threshold"])
    assert sidecar["training"] == "test run" and meta["backbone"] == "scratch_cnn"
    assert "Model card" in (tmp_path / "m.md").read_text()

    table = workflow.comparison_table({"a": evaluation, "b": evaluation})
    assert list(table.columns) == ["a", "b"]
    assert table.loc["auc", "a"].count("(") == 1 and "threshold (from validation)" in table.index

    captions = workflow.prediction_captions(y, [0, 1], {"a": (proba, 0.5), "b": (1 - proba, 0.5)})
    assert captions[0].startswith("true NORMAL\na: p=") and "\nb: p=" in captions[0]
