"""``pneumo ensemble``: saved members of one task become one saved model with
its own sidecar (threshold chosen on labelled images, or recorded as not chosen); members of
different tasks and free-size members without a size are refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils.evaluation import ensemble as command
from pneumo_utils.evaluation.ensemble import UNSET_RULE
from pneumo_utils.model import backbones, ensemble, inference, saving


def _save(folder: Path, name: str, size: int, seed: int, task: str = "pneumonia") -> Path:
    model = backbones.build_scratch_cnn(size, filters=(4,), dense_units=4, seed=seed)
    path = folder / f"{name}.keras"
    saving.save_model(model, path, saving.model_metadata(model, task=task, threshold=0.3))
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("members")
    return [_save(folder, "a", 32, 0), _save(folder, "b", 48, 1)]


def test_ensemble_without_data_records_an_unset_threshold(members, tmp_path, capsys):
    out = tmp_path / "ens.keras"
    assert command.main([*map(str, members), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "not chosen" in captured.err and "ens.keras" in captured.out
    model, meta = saving.load_model(out)
    assert meta["task"] == "pneumonia" and meta["image_size"] == 48
    assert meta["threshold"] == 0.5 and meta["threshold_rule"] == UNSET_RULE
    assert [m["threshold"] for m in meta["members"]] == [0.3, 0.3]
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype(np.float32)
    loaded = [saving.load_model(p)[0] for p in members]
    expected = (loaded[0].predict(keras.ops.image.resize(x, (32, 32)), verbose=0)
                + loaded[1].predict(x, verbose=0)) / 2
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_ensemble_threshold_is_chosen_on_labelled_images(members, tmp_path):
    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    for name, grey in (("NORMAL", 90), ("PNEUMONIA", 160)):
        (site / name).mkdir(parents=True)
        for i in range(12):
            stem = f"IM-{i:04d}-0001" if name == "NORMAL" else f"person{i}_virus_{i}"
            pixels = np.clip(rng.normal(grey, 40, (48, 48)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(site / name / f"{stem}.png")
    out = tmp_path / "ens.keras"
    assert command.main([*map(str, members), "--out", str(out), "--data", str(site), "--rule", "f1"]) == 0
    model, meta = saving.load_model(out)
    assert "24 labelled images of site" in meta["threshold_rule"]
    assert meta["threshold_data"]["n_images"] == 24
    proba = inference.predict_paths(model, sorted(str(p) for p in site.rglob("*.png")))
    assert meta["threshold"] in set(np.round(proba, 6)) or proba.min() <= meta["threshold"] <= proba.max()


def test_members_of_different_tasks_are_refused_naming_both(members, tmp_path, error_line):
    viral = _save(tmp_path, "viral", 32, 2, task="bacterial_vs_viral")
    assert command.main([str(members[0]), str(viral), "--out", str(tmp_path / "e.keras")]) == 2
    line = error_line()
    assert "viral.keras is a bacterial_vs_viral" in line and "a.keras is a pneumonia" in line
    assert not (tmp_path / "e.keras").exists()


def test_free_size_member_needs_its_size(tmp_path, error_line):
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    free = keras.Model(inputs, outputs, name="free")
    fixed = backbones.build_scratch_cnn(32, filters=(4,), dense_units=4, seed=0)
    with pytest.raises(ValueError, match="member free accepts any input size"):
        ensemble.average([free, fixed], image_size=32)
    with pytest.raises(ValueError, match="image_size=N"):
        saving.model_metadata(free)
    path = tmp_path / "free.keras"
    saving.save_model(free, path, saving.model_metadata(free, image_size=40))
    other = _save(tmp_path, "fixed", 32, 0)
    out = tmp_path / "ens.keras"
    assert command.main([str(path), str(other), "--out", str(out)]) == 0
    _, meta = saving.load_model(out)
    assert meta["image_size"] == 40 and [m["image_size"] for m in meta["members"]] == [40, 32]
    assert json.loads(saving.sidecar_path(out).read_text())["fingerprint"]
