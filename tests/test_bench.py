"""``python benchmarks/bench.py --quick`` on generated data: every figure is there, printed once
and sane; the notebook figures are read from a run summary; the memory sampler sees a child's
memory. Nothing is asserted about speed (that depends on the machine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import make_kermany_like

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench.py"

EXPECTED = {
    "a_images_epoch_s", "a_images_first_epoch_s", "a_features_epoch_s", "a_features_first_epoch_s",
    "a_feature_extraction_s", "a_feature_extraction_images_per_s", "a_epoch_speedup",
    "a_epoch_speedup_incl_first", "a_test_auc_images", "a_test_auc_features", "a_test_auc_abs_diff",
    "c_predict_cli_s", "c_tensorflow_import_s", "c_predict_paths_images_per_s",
    "c_bare_predict_images_per_s", "c_bare_predict_with_decode_images_per_s", "c_throughput_ratio",
    "c_throughput_ratio_vs_bare_with_decode",
    "d_peak_rss_mib", "d_peak_rss_largest_process_mib",
    "e_fp32_images_per_s", "e_bf16_images_per_s", "e_bf16_speedup",
    "e_bf16_feature_relative_difference",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_mode_writes_every_figure(tmp_path):
    root = make_kermany_like(tmp_path / "data", n_train_per_class=16, n_val_per_class=4,
                             n_test_per_class=8, image_size=48, seed=0)
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data-root", str(root), "--weights", "none",
         "--out", str(out), "--image-size", "32", "--max-images-per-class", "12",
         "--batch-size", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert set(figures) == EXPECTED and result["failures"] == []
    printed = done.stdout.splitlines()
    assert sorted(line.split(":", 1)[0] for line in printed) == sorted(EXPECTED), \
        "one printed line per figure, nothing else on stdout"

    values = {name: f["value"] for name, f in figures.items() if name != "d_peak_rss_largest_process_mib"}
    for name, value in values.items():
        assert isinstance(value, int | float) and math.isfinite(value) and value >= 0, name
    for name in ("a_images_epoch_s", "a_features_epoch_s", "a_feature_extraction_s",
                 "c_predict_cli_s", "c_predict_paths_images_per_s", "e_fp32_images_per_s"):
        assert values[name] > 0, name
    for name in ("a_test_auc_images", "a_test_auc_features"):
        assert 0.0 <= values[name] <= 1.0, name
    assert values["a_test_auc_abs_diff"] == pytest.approx(
        abs(values["a_test_auc_images"] - values["a_test_auc_features"]))
    assert values["a_epoch_speedup"] == pytest.approx(
        values["a_images_epoch_s"] / values["a_features_epoch_s"])
    assert values["c_throughput_ratio"] == pytest.approx(
        values["c_predict_paths_images_per_s"] / values["c_bare_predict_images_per_s"])
    # the predict command's process counts: more than this process alone, within reason
    assert 100 < values["d_peak_rss_mib"] < 64 * 1024
    assert figures["d_peak_rss_largest_process_mib"]["value"] <= values["d_peak_rss_mib"]
    assert values["e_bf16_feature_relative_difference"] < 1.0

    targeted = {name for name, f in figures.items() if f["target"] is not None}
    assert targeted == {"a_epoch_speedup", "a_test_auc_abs_diff", "c_predict_cli_s",
                        "c_throughput_ratio", "d_peak_rss_mib"}
    for line in printed:
        name = line.split(":", 1)[0]
        if name in targeted:
            assert line.endswith("met]" if figures[name]["met"] else "NOT MET]"), line

    machine = result["machine"]
    assert machine["cpu_model"] and machine["cpu_cores_logical"] >= 1 and machine["ram_gib"] > 0
    assert len(machine["load_average_at_start"]) == 3 and machine["tensorflow"].count(".") >= 1
    assert result["mode"] == "quick" and result["settings"]["image_size"] == 32
    assert result["data"]["test"]["images"] == 16


def test_notebook_figures_from_a_summary(bench, tmp_path, capsys):
    summary = {"notebooks": {
        "01_a": {"status": "ok", "seconds": 300.0}, "02_b": {"status": "failed", "seconds": 20.0},
        "03_c": {"status": "ok", "seconds": 1500.0}, "04_d": {"status": "ok", "seconds": 60.0}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    args = argparse.Namespace(from_summary=str(path))
    figures = bench.Figures()
    bench.run_notebooks(args, tmp_path, figures)
    assert [figures[f"b_{n}_s"]["value"] for n in ("01_a", "02_b", "03_c", "04_d")] == [300.0, 20.0, 1500.0, 60.0]
    assert figures["b_all_notebooks_s"]["value"] == pytest.approx(1880.0)
    assert figures["b_all_notebooks_s"]["met"] is False  # over 20 min, and one notebook failed
    assert capsys.readouterr().out.splitlines()[-1].endswith("[target <= 1200 s: NOT MET]")

    summary["notebooks"]["02_b"]["status"] = "ok"
    summary["notebooks"]["03_c"]["seconds"] = 500.0
    path.write_text(json.dumps(summary))
    figures = bench.Figures()
    bench.run_notebooks(args, tmp_path, figures)
    assert figures["b_all_notebooks_s"]["met"] is True


def test_memory_sampler_sees_a_child(bench):
    code = "import time; x = bytearray(80 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(3)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        sampler = bench.MemorySampler(os.getpid(), interval=0.1)
        sampler.start()
        time.sleep(1.5)
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert sampler.peaks[child.pid][0] > 70
    assert "bytearray" in sampler.peaks[child.pid][1]
    assert sampler.max_total_mib > sampler.peaks[child.pid][0]  # this process counts too
