"""``python -m pneumo_utils.bench --quick`` on generated data: every figure is there, printed
once and sane. Nothing is asserted about speed (that depends on the machine)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import time

import pytest

from pneumo_utils import bench
from pneumo_utils.synthetic import make_kermany_like

pytestmark = pytest.mark.slow

EXPECTED = {
    "a_images_epoch_s", "a_images_first_epoch_s", "a_features_epoch_s", "a_features_first_epoch_s",
    "a_feature_extraction_s", "a_feature_extraction_images_per_s", "a_epoch_speedup",
    "a_epoch_speedup_incl_first", "a_test_auc_images", "a_test_auc_features", "a_test_auc_abs_diff",
    "b_all_notebooks_s",
    "c_predict_cli_s", "c_tensorflow_import_s", "c_predict_paths_images_per_s",
    "c_bare_predict_images_per_s", "c_bare_predict_with_decode_images_per_s", "c_throughput_ratio",
    "c_throughput_ratio_vs_bare_with_decode",
    "d_peak_rss_mib",
    "e_fp32_images_per_s", "e_bf16_images_per_s", "e_bf16_speedup",
    "e_bf16_feature_relative_difference",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    root = make_kermany_like(tmp / "data", n_train_per_class=16, n_val_per_class=4,
                             n_test_per_class=8, image_size=48, seed=0)
    out = tmp / "results.json"
    argv = ["--quick", "--data-root", str(root), "--weights", "none", "--out", str(out),
            "--image-size", "32", "--max-images-per-class", "12", "--batch-size", "8",
            "--cli-runs", "1", "--throughput-images", "8", "--throughput-repeats", "1",
            "--bf16-image-size", "32", "--bf16-images", "8"]
    return argv, out


def test_quick_mode_writes_every_figure(quick_run, capsys):
    argv, out = quick_run
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    result = json.loads(out.read_text())
    figures = result["figures"]

    assert set(figures) == EXPECTED
    assert result["failures"] == []
    names = [line.split(":", 1)[0] for line in printed]
    assert sorted(names) == sorted(EXPECTED), "one printed line per figure, nothing else on stdout"

    measured = {name: f["value"] for name, f in figures.items() if f["value"] is not None}
    assert set(measured) == EXPECTED - {"b_all_notebooks_s"}  # (b) is skipped in quick mode
    assert "quick mode" in figures["b_all_notebooks_s"]["note"]
    for name, value in measured.items():
        assert isinstance(value, int | float) and math.isfinite(value), name
        assert value >= 0, name
    for name in ("a_images_epoch_s", "a_features_epoch_s", "a_feature_extraction_s",
                 "c_predict_cli_s", "c_predict_paths_images_per_s", "e_fp32_images_per_s"):
        assert measured[name] > 0, name
    for name in ("a_test_auc_images", "a_test_auc_features"):
        assert 0.0 <= measured[name] <= 1.0, name
    auc_diff = abs(measured["a_test_auc_images"] - measured["a_test_auc_features"])
    assert measured["a_test_auc_abs_diff"] == pytest.approx(auc_diff)
    speedup = measured["a_images_epoch_s"] / measured["a_features_epoch_s"]
    assert measured["a_epoch_speedup"] == pytest.approx(speedup)
    assert 50 < measured["d_peak_rss_mib"] < 64 * 1024
    assert measured["e_bf16_feature_relative_difference"] < 1.0

    # a verdict beside every figure with a target, and it agrees with the JSON
    targeted = {name for name, f in figures.items() if f["target"] is not None}
    assert targeted == {"a_epoch_speedup", "a_test_auc_abs_diff", "c_predict_cli_s",
                        "c_throughput_ratio", "d_peak_rss_mib"}
    for line in printed:
        name = line.split(":", 1)[0]
        if name in targeted:
            verdict = "met]" if figures[name]["met"] else "NOT MET]"
            assert line.endswith(verdict), line

    machine = result["machine"]
    assert machine["cpu_model"] and machine["cpu_cores_logical"] >= 1
    assert machine["ram_gib"] is None or machine["ram_gib"] > 0
    assert machine["tensorflow"].count(".") >= 1
    assert dt.datetime.fromisoformat(result["date"]).tzinfo is not None
    assert result["mode"] == "quick" and result["settings"]["image_size"] == 32
    assert len(result["details"]["a"]["images_epoch_seconds"]) == 2


def test_from_summary_reads_seconds_per_notebook(tmp_path, capsys):
    summary = {"profile": "full", "notebooks": {
        "01_a": {"status": "ok", "seconds": 300.0}, "02_b": {"status": "failed", "seconds": 20.0},
        "03_c": {"status": "ok", "seconds": 1500.0}, "04_d": {"status": "ok", "seconds": 60.0}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    cfg = bench.make_config(bench.build_parser().parse_args(["--full", "--from-summary", str(path)]))
    figures: list[bench.Figure] = []
    details, memory = bench.bench_run_all(cfg, tmp_path, figures)
    by_name = {f.name: f for f in figures}
    assert memory is None and details["notebooks"]["03_c"]["seconds"] == 1500.0
    assert [by_name[f"b_{n}_s"].value for n in ("01_a", "02_b", "03_c", "04_d")] == [300.0, 20.0, 1500.0, 60.0]
    assert by_name["b_all_notebooks_s"].value == pytest.approx(1880.0)
    assert by_name["b_all_notebooks_s"].met is False  # over 20 min in all, and one notebook failed
    summary["notebooks"]["02_b"]["status"] = "ok"
    summary["notebooks"]["03_c"]["seconds"] = 500.0
    path.write_text(json.dumps(summary))
    figures = []
    bench.bench_run_all(cfg, tmp_path, figures)
    assert {f.name: f for f in figures}["b_all_notebooks_s"].met is True
    assert capsys.readouterr().out.count("\n") == 10


def test_memory_poller_sees_the_peak_of_a_child():
    code = "import time; x = bytearray(50 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(3)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        poller = bench.TreeMemoryPoller(os.getpid(), interval=0.1)
        poller.start()
        time.sleep(1.5)
        poller.stop()
    finally:
        child.kill()
        child.wait()
    assert child.pid in poller.peaks_kib
    assert poller.peaks_kib[child.pid] > 40 * 1024
