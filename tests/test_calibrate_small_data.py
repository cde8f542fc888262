"""Calibration on data that cannot set an operating point is refused (too few images of a class,
one file under both labels, a temperature at the edge of its search), copies within a class
count once, and a small sample's proportions get intervals no narrower than the exact one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_utils.evaluation import calibrate, metrics
from pneumo_utils.model import saving

SIZE = 32


def _site(root: Path, per_class: int, grey: dict[str, float], seed: int = 0) -> Path:
    """A ``{NORMAL,PNEUMONIA}`` folder of noisy grey images around ``grey[class]``."""
    rng = np.random.default_rng(seed)
    for name, level in grey.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level + rng.normal(0, 8), 10, (SIZE, SIZE)), 0, 255)
            stem = f"IM-{i:04d}-0001" if name == "NORMAL" else f"person{i}_bacteria_{i}"
            Image.fromarray(pixels.astype(np.uint8)).convert("RGB").save(root / name / f"{stem}.jpeg")
    return root


OVERLAPPING = {"NORMAL": 120, "PNEUMONIA": 140}
"""Grey levels whose brightness scores overlap: a temperature inside the search range."""


@pytest.fixture(scope="module")
def brightness_model(tmp_path_factory) -> Path:
    """P(PNEUMONIA) = sigmoid(40 * (mean pixel / 255 - 0.5)): 0.5 at grey level 128."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("head_output").set_weights([np.full((3, 1), 40.0 / 3), np.array([-20.0])])
    path = tmp_path_factory.mktemp("bright") / "bright.keras"
    saving.save_model(model, path, saving.model_metadata(model, threshold=0.5, threshold_rule="fixed 0.5"))
    return path


def _run(model: Path, site: Path, out: Path) -> int:
    return calibrate.main(["--model", str(model), "--data", str(site), "--out", str(out),
                           "--n-boot", "50", "--target-accuracy", "0"])


def test_one_image_per_class_is_refused_with_the_minimum(brightness_model, tmp_path, error_line):
    site = _site(tmp_path / "site", 1, OVERLAPPING)
    assert _run(brightness_model, site, tmp_path / "out.keras") == 2
    line = error_line()
    assert f"at least {calibrate.MIN_IMAGES_PER_CLASS} per class" in line and "1 NORMAL" in line
    assert not (tmp_path / "out.keras").exists()


def test_one_file_under_both_classes_is_refused(brightness_model, tmp_path, error_line):
    site = _site(tmp_path / "site", 12, OVERLAPPING)
    shutil.copyfile(site / "NORMAL" / "IM-0000-0001.jpeg", site / "PNEUMONIA" / "person99_virus_99.jpeg")
    assert _run(brightness_model, site, tmp_path / "out.keras") == 2
    assert "same content" in error_line()


def test_copies_within_a_class_count_once(brightness_model, tmp_path, error_line):
    site = _site(tmp_path / "site", 9, OVERLAPPING)
    for i in range(5):  # 9 distinct + 5 copies = 14 files, still under the minimum of 10 distinct
        shutil.copyfile(site / "NORMAL" / "IM-0000-0001.jpeg", site / "NORMAL" / f"IM-{90 + i}-0001.jpeg")
    assert _run(brightness_model, site, tmp_path / "out.keras") == 2
    assert "only 9 NORMAL, 9 PNEUMONIA distinct" in error_line()


def test_perfectly_separated_site_fits_no_temperature(brightness_model, tmp_path, error_line):
    site = _site(tmp_path / "site", 16, {"NORMAL": 100, "PNEUMONIA": 160})
    assert _run(brightness_model, site, tmp_path / "out.keras") == 2
    line = error_line()
    assert "edge of the range searched" in line and "0.05" in line


def test_small_site_is_calibrated_with_honest_intervals(brightness_model, tmp_path, capsys):
    site = _site(tmp_path / "site", 12, OVERLAPPING)
    out = tmp_path / "out.keras"
    assert _run(brightness_model, site, out) == 0
    assert "fewer than 50 per class" in capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    record = meta["calibration"]
    assert record["copies_left_out"] == 0
    for name in ("sensitivity", "specificity"):
        lo, hi = record["after"][f"{name}_ci"]
        k = round(record["after"][name] * 12)
        exact = metrics.proportion_ci(k, 12)
        assert lo <= exact[0] + 1e-12 and hi >= exact[1] - 1e-12 and hi - lo > 0.15
    saving.load_model(out)  # the rewritten sidecar carries its own fingerprint


def test_bootstrap_of_a_perfect_sample_is_not_zero_wide():
    y = np.repeat([0, 1], 30)
    ci = metrics.bootstrap_ci(y, np.where(y == 1, 0.9, 0.1), 0.5, n_boot=100)
    for name in ("sensitivity", "specificity", "accuracy"):
        assert ci[name][1] == 1.0 and ci[name][0] < 0.95
    assert ci["sensitivity"][0] == pytest.approx(0.8843, abs=1e-3)  # Clopper-Pearson 30/30
