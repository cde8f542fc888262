"""Site calibration on generated data: a model whose score is the image's brightness, and a
"site" whose images are all brighter than the training collection's, so the stored threshold
calls every healthy child "pneumonia". The calibrated copy must move the threshold, keep the
weights, record the rule, data and counts, and warn when a class has few images."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils.deploy import predict
from pneumo_utils.evaluation import calibrate
from pneumo_utils.model import saving
from pneumo_utils.runner import index_page, selection

SIZE = 64


def _site(root: Path, normal_grey: float, pneumonia_grey: float, per_class: int, seed: int = 0) -> Path:
    """A ``{NORMAL,PNEUMONIA}`` folder of noisy grey images around the given mean grey levels."""
    rng = np.random.default_rng(seed)
    for name, grey in (("NORMAL", normal_grey), ("PNEUMONIA", pneumonia_grey)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            level = grey + rng.normal(0, 8)
            pixels = np.clip(rng.normal(level, 10, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            stem = f"IM-{i:04d}-0001" if name == "NORMAL" else f"person{i}_bacteria_{i}"
            Image.fromarray(pixels).convert("RGB").save(root / name / f"{stem}.jpeg", quality=95)
    return root


@pytest.fixture()
def brightness_model(tmp_path: Path) -> Path:
    """P(PNEUMONIA) = sigmoid(40 * (mean pixel / 255 - 0.4)): above 0.5 from grey level 102."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("head_output").set_weights([np.full((3, 1), 40.0 / 3), np.array([-16.0])])
    path = tmp_path / "bright.keras"
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5, threshold_rule="fixed 0.5"))
    return path


def test_calibrated_copy_moves_the_threshold_and_keeps_the_weights(brightness_model, tmp_path, capsys):
    site = _site(tmp_path / "site", normal_grey=130, pneumonia_grey=180, per_class=60)
    out = tmp_path / "bright.site.keras"
    assert calibrate.main(["--model", str(brightness_model), "--data", str(site), "--out", str(out),
                           "--n-boot", "200"]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    meta = json.loads(out.with_suffix(".json").read_text())
    record = meta["calibration"]
    assert record["counts"] == {"NORMAL": 60, "PNEUMONIA": 60}
    assert record["before"]["specificity"] < 0.1  # the stored threshold calls every NORMAL image PNEUMONIA
    assert record["after"]["specificity"] > 0.9 and record["after"]["sensitivity"] > 0.9
    lo, hi = record["after"]["specificity_ci"]
    assert lo <= record["after"]["specificity"] <= hi
    assert meta["threshold"] == record["threshold"] > 0.5
    assert "site calibration" in meta["threshold_rule"] and "site" in meta["threshold_rule"]
    assert out.read_bytes() == brightness_model.read_bytes()  # same weights, byte for byte
    assert json.loads(brightness_model.with_suffix(".json").read_text())["threshold"] == 0.5
    assert "## Site calibration" in out.with_suffix(".md").read_text()
    model, loaded = saving.load_model(out)
    normal = sorted((site / "NORMAL").iterdir())[0]
    assert predict.predict_image(model, loaded, normal)["label"] == "NORMAL"


def test_few_images_per_class_warn_with_the_interval_width(brightness_model, tmp_path, capsys):
    site = _site(tmp_path / "small", normal_grey=130, pneumonia_grey=180, per_class=12)
    out = tmp_path / "small.keras"
    assert calibrate.main(["--model", str(brightness_model), "--data", str(site), "--out", str(out),
                           "--n-boot", "100"]) == 0
    err = capsys.readouterr().err
    assert "warning: only 12 NORMAL, 12 PNEUMONIA image(s) (fewer than 50 per class)" in err
    assert "CI" in err and "wide" in err
    assert "warning" in json.loads(out.with_suffix(".json").read_text())["calibration"]


def test_bad_calibration_requests_are_one_line(brightness_model, tmp_path, capsys, error_line):
    site = _site(tmp_path / "s", normal_grey=130, pneumonia_grey=180, per_class=4)
    assert calibrate.main(["--model", str(brightness_model), "--data", str(site),
                           "--out", str(brightness_model)]) == 2
    assert "is the model itself" in error_line()
    assert calibrate.main(["--model", str(brightness_model), "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "x.keras")]) == 2
    assert "nowhere" in error_line()
    assert calibrate.main(["--model", str(brightness_model), "--data", str(site),
                           "--out", str(tmp_path / "x.keras"), "--rule", "best"]) == 2
    assert "unknown threshold rule" in error_line()
    assert not (tmp_path / "x.keras").exists()


def test_runner_points_best_at_the_copy_calibrated_on_external_validation(brightness_model, tmp_path):


    site = _site(tmp_path / "site", normal_grey=130, pneumonia_grey=180, per_class=20)
    best = {"model_path": str(brightness_model), "name": "bright", "task": "kermany", "notebook": "01_x",
            "weights": "w", "rule": selection.EXTERNAL_RULE, "rule_data": str(site), "rule_value": 0.99}
    best["calibration"] = selection.calibrate_best(best, site)
    pointer = json.loads(selection.write_best(best, tmp_path).read_text())
    assert pointer["model"] == "bright.calibrated.keras" and pointer["trained_model"] == "bright.keras"
    assert pointer["calibration"]["counts"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert pointer["calibration"]["after"]["specificity"] > 0.9 and "warning" in pointer["calibration"]
    meta = json.loads((tmp_path / "bright.calibrated.json").read_text())
    assert meta["threshold"] == pointer["calibration"]["threshold"]
    assert selection.calibrate_best({"model_path": str(tmp_path / "missing.keras")}, site) is None
    table = index_page.model_tables([{**best, "best": False, "argmax": False, "roc": None}],
                                {"kermany": {**best, "pointer": "best.json"}})[0]
    assert table["best"]["calibrated"] == "bright.calibrated.keras"
