"""The saved-model contract: edited sidecars, ensembles of mixed tasks, calibration on tiny or
degenerate data. Each case saves a tiny Keras model (32 px, P(PNEUMONIA) from the mean
brightness) with this checkout's ``save_model``, then edits what the case is about."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hostile_inputs
import numpy as np
from hostile_inputs import Case
from PIL import Image

SIZE = 32


def _model(path: Path, task: str = "pneumonia") -> Path:
    """A saved model whose output is sigmoid(40 * (mean pixel / 255 - 0.5)), with its sidecar."""
    import keras

    from pneumo_utils.model import saving

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, outputs, name=path.stem)
    model.get_layer("head_output").set_weights([np.full((3, 1), 40.0 / 3), np.array([-20.0])])
    saving.save_model(model, path, saving.model_metadata(model, task=task))
    return path


def _edit_sidecar(model: Path, change) -> None:
    sidecar = model.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    change(meta)
    sidecar.write_text(json.dumps(meta))


def _to_viral(meta: dict) -> None:
    meta.update(task="bacterial_vs_viral", class_names=["BACTERIAL PNEUMONIA", "VIRAL PNEUMONIA"])


def _image(path: Path, grey: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(grey, 10, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _site(root: Path, per_class: int, grey: dict[str, float]) -> Path:
    """A ``{NORMAL,PNEUMONIA}`` folder of Kermany-named grey PNGs."""
    for name, level in grey.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            stem = f"IM-{i:04d}-0001" if name == "NORMAL" else f"person{i}_bacteria_{i}"
            _image(root / name / f"{stem}.png", level + 3 * i, seed=i)
    return root


def edited_task(folder: Path) -> list[str]:
    model = _model(folder / "m.keras")
    _edit_sidecar(model, _to_viral)
    return [*hostile_inputs.command("predict"), str(_image(folder / "x.png", 200)), "--model", str(model)]


def deleted_digest(folder: Path) -> list[str]:
    model = _model(folder / "m.keras")

    def change(meta: dict) -> None:
        _to_viral(meta)
        meta.pop("sha256")
        meta.pop("fingerprint", None)

    _edit_sidecar(model, change)
    return [*hostile_inputs.command("predict"), str(_image(folder / "x.png", 200)), "--model", str(model)]


def mixed_ensemble(folder: Path) -> list[str]:
    pneumonia = _model(folder / "pneumonia.keras")
    viral = _model(folder / "viral.keras", task="bacterial_vs_viral")
    return [*hostile_inputs.command("ensemble"), "--out", str(folder / "ensemble.keras"),
            str(pneumonia), str(viral)]


def _calibrate(folder: Path, site: Path) -> list[str]:
    return [*hostile_inputs.command("calibrate"), "--model", str(_model(folder / "m.keras")),
            "--data", str(site), "--out", str(folder / "m.site.keras"), "--n-boot", "200"]


def one_per_class(folder: Path) -> list[str]:
    return _calibrate(folder, _site(folder / "site", 1, {"NORMAL": 110, "PNEUMONIA": 150}))


def same_image_each_class(folder: Path) -> list[str]:
    site = folder / "site"
    picture = _image(folder / "one.png", 128)
    for name, stem in (("NORMAL", "IM-{:04d}-0001"), ("PNEUMONIA", "person{0}_bacteria_{0}")):
        (site / name).mkdir(parents=True)
        for i in range(10):
            shutil.copyfile(picture, site / name / f"{stem.format(i)}.png")
    return _calibrate(folder, site)


def thirty_two_images(folder: Path) -> list[str]:
    return _calibrate(folder, _site(folder / "site", 16, {"NORMAL": 80, "PNEUMONIA": 160}))


CASES = [
    Case("models", "predict: sidecar task edited to bacterial_vs_viral", edited_task),
    Case("models", "predict: task edited, sha256 (and fingerprint) deleted", deleted_digest),
    Case("models", "ensemble: pneumonia + bacterial_vs_viral members", mixed_ensemble),
    Case("models", "calibrate: 1 image per class", one_per_class),
    Case("models", "calibrate: the same image 10 times in each class", same_image_each_class),
    Case("models", "calibrate: 32 images the model separates", thirty_two_images),
]
