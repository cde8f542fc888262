"""Notebook 01's smoke profile on the real Kermany images in ../shared (skipped without it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def test_notebook_01_smoke_on_real_images(shared_dir, tmp_path):
    data_root = shared_dir / "data" / "chest_xray"
    if not data_root.is_dir():
        pytest.skip(f"{data_root} not found")
    reports = tmp_path / "reports"
    command = [
        sys.executable, "-m", "pneumo_utils.runner", "--profile", "smoke", "--notebooks", "01",
        "--data-root", str(data_root), "--reports-dir", str(reports),
        "--set", f"models_dir={tmp_path / 'models'}", "--set", f"cache_dir={tmp_path / 'cache'}",
        "--set", "n_boot=200",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((reports / "01_kermany_densenet121.metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 24 and 0.0 <= test["auc"] <= 1.0
    assert test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]
    assert "validation" in metrics["threshold_rule"]
    html = (reports / "01_kermany_densenet121.html").read_text()
    assert "Not for diagnostic use" in html and "Grad-CAM" in html
    assert (reports / "index.html").is_file()
    assert (tmp_path / "models" / "01_kermany_densenet121.keras").is_file()
