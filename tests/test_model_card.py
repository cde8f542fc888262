"""The model card rendered from its jinja2 template, for a binary and a three-class model."""

from __future__ import annotations

import jinja2
import numpy as np
import pandas as pd
import pytest

from pneumo_utils.evaluation.metrics import evaluation_report
from pneumo_utils.explain.report import describe_split, describe_weights
from pneumo_utils.model import card

THREE = ["NORMAL", "BACTERIA", "VIRUS"]


def _index(n_classes: int) -> pd.DataFrame:
    rows = [{"split": split, "label": i % n_classes, "patient": f"{split}-{i // 2}"}
            for split, n in (("train", 60), ("val", 12), ("test", 18)) for i in range(n)]
    return pd.DataFrame(rows)


def _binary() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    proba = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    evaluation = evaluation_report(y_test=y, proba_test=proba, y_val=y, proba_val=proba, n_boot=20)
    meta = {"name": "densenet", "task": "pneumonia", "class_names": ["NORMAL", "PNEUMONIA"],
            "backbone": "densenet121", "image_size": 224, "weights": describe_weights("/w/densenet121_notop.h5"),
            "data": describe_split(_index(2), ["NORMAL", "PNEUMONIA"]), "training": "2 epochs"}
    return meta, evaluation


def _three_class() -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2] * 20)
    proba = rng.dirichlet([1, 1, 1], 60)
    proba[np.arange(60), y] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    evaluation = evaluation_report(y_test=y, proba_test=proba, y_val=y, proba_val=proba, n_boot=20,
                                   class_names=THREE)
    meta = {"name": "scratch", "task": "three_class", "class_names": THREE, "backbone": "scratch_cnn",
            "image_size": 64, "weights": describe_weights(None), "data": describe_split(_index(3), THREE)}
    return meta, evaluation


def test_binary_card_states_task_threshold_weights_split_and_use():
    meta, evaluation = _binary()
    text = card.model_card(meta, evaluation)
    lines = text.splitlines()
    assert lines[0] == "# Model card: densenet"
    assert "- **Task**: pneumonia (NORMAL, PNEUMONIA)" in lines
    assert (f"- **Decision threshold**: {evaluation['threshold']:.4f} on the raw output, chosen by "
            f"{evaluation['threshold_rule']}.") in lines
    assert "- **Weights**: ImageNet (densenet121_notop.h5)" in lines
    assert "- **Data and split**: train: 60 images (30 PNEUMONIA) from 30 patients; val: 12 images" in text
    assert "sigmoid output = P(PNEUMONIA); below the threshold: NORMAL." in text
    assert "**Not for diagnostic use.**" in text and "argmax" not in text
    test = evaluation["test"]
    assert f"| auc | {test['auc']:.3f} | {test['auc_ci'][0]:.3f} - {test['auc_ci'][1]:.3f} |" in lines
    assert "None: no labelled external validation set was found for this run." in lines
    assert "- **Input check**: none. This model answers every image, photographs included; `predict` says so." in lines
    assert "\n\n\n" not in text and text.endswith("rather than pathology.\n")


def test_three_class_card_states_argmax_and_each_class():
    meta, evaluation = _three_class()
    text = card.model_card(meta, evaluation)
    lines = text.splitlines()
    assert "- **Task**: three_class (NORMAL, BACTERIA, VIRUS)" in lines
    assert "- **Decision**: the most probable class (argmax); there is no threshold to choose." in lines
    assert "Decision threshold" not in text
    assert "- **Weights**: random initialisation" in lines
    assert "- **Data and split**: train: 60 images (20 NORMAL, 20 BACTERIA, 20 VIRUS) from 30 patients" in text
    assert "softmax output, one probability each for NORMAL, BACTERIA, VIRUS." in text
    assert "**Not for diagnostic use.**" in text
    assert any(line.startswith("| auc (macro one-vs-rest) | ") for line in lines)
    assert "| true \\ predicted | pred NORMAL | pred BACTERIA | pred VIRUS |" in lines
    matrix = evaluation["test"]["confusion_matrix"]
    for name, row in zip(THREE, matrix, strict=True):
        assert f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |" in lines
    per_class = [line for line in lines if line.startswith(("| NORMAL | ", "| BACTERIA | ", "| VIRUS | "))]
    assert len(per_class) == 6  # a per-class row and a confusion row each
    assert "\n\n\n" not in text


def test_card_template_ships_with_the_package_and_refuses_a_missing_field():
    assert card._TEMPLATES.get_template("model_card.md.j2").filename.endswith(
        "pneumo_utils/model/templates/model_card.md.j2")
    meta, evaluation = _binary()
    del evaluation["test"]["ece"]
    with pytest.raises(jinja2.UndefinedError, match="ece"):
        card.model_card(meta, evaluation)


def test_card_written_atomically_replaces_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside.md"
    outside.write_text("keep me")
    target = tmp_path / "model.md"
    target.symlink_to(outside)
    meta, evaluation = _binary()
    card.write_model_card(target, meta, evaluation)
    assert outside.read_text() == "keep me" and not target.is_symlink()
    assert target.read_text() == card.model_card(meta, evaluation)
