"""The threshold and error explorer on generated data: the widget's table follows the slider and
the marked thresholds, the error gallery shows the set's mistakes, and the static version a
rendered report shows carries the same table at the model's threshold."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pneumo_utils.explain import explorer


@pytest.fixture()
def sets(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("validation", 30), ("external validation", 20)):
        labels = rng.integers(0, 2, n)
        proba = np.clip(0.3 * labels + rng.uniform(0, 0.7, n), 0, 1)
        paths = []
        for i in range(n):
            path = tmp_path / f"{name[:3]}{i}.png"
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        out[name] = (paths, labels, proba)
    return out


def test_table_counts_follow_the_threshold(sets):
    paths, labels, proba = sets["validation"]
    everything = explorer.table_at({"v": sets["validation"]}, 0.0)
    assert f"<td>true positives</td><td>{labels.sum()}</td>" in everything
    assert f"<td>false positives</td><td>{(labels == 0).sum()}</td>" in everything
    nothing = explorer.table_at({"v": sets["validation"]}, 1.01)
    assert "<td>sensitivity</td><td>0.000</td>" in nothing and "<td>specificity</td><td>1.000</td>" in nothing


def test_errors_are_the_most_confident_mistakes_first(sets):
    _, labels, proba = sets["validation"]
    rows = explorer.errors_at(labels, proba, 0.5, "false positives", limit=50)
    assert all(labels[r] == 0 and proba[r] >= 0.5 for r in rows)
    assert list(proba[rows]) == sorted(proba[rows], reverse=True)
    assert len(rows) == ((labels == 0) & (proba >= 0.5)).sum()


def test_the_widget_responds_and_the_static_version_matches(sets):
    shown = explorer.explorer(sets, threshold=0.5, marks={"calibrated on A": 0.62}, limit=4)
    before = shown.table.value
    shown.slider.value = 0.62
    assert shown.table.value != before and "threshold 0.6200" in shown.table.value
    bundle = shown._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert explorer.table_at(sets, 0.5) in bundle["text/html"]
    assert bundle["text/html"].count("data:image/jpeg;base64,") >= 1  # the static error gallery
