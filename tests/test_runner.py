"""Tests for the notebook runner (pneumo_utils.runner) and the data fetcher (pneumo_utils.fetch).

The runner tests execute the tiny notebooks in tests/fixtures/notebooks with the "python3"
kernel (a few seconds in all); the fetch tests never touch the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from pneumo_utils import fetch, runner

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


# --------------------------------------------------------------------------- runner: units


def test_parse_sets_parses_yaml_values_and_targets() -> None:
    sets = runner.parse_sets(
        ["01.epochs=3", "seed=7", "max_images_per_class=null", "flag=true", "name=abc", "x="]
    )
    assert sets == [
        ("01", "epochs", 3),
        (None, "seed", 7),
        (None, "max_images_per_class", None),
        (None, "flag", True),
        (None, "name", "abc"),
        (None, "x", ""),
    ]
    with pytest.raises(runner.UsageError):
        runner.parse_sets(["no_equals_sign"])


def test_notebook_parameters_precedence_and_data_roots() -> None:
    profile = {
        "default": {"epochs": 10, "max_images_per_class": None, "batch_size": 8},
        "01_kermany_densenet121": {"epochs": 5, "weights": "imagenet"},
        "02_nih_binary": {"labels": "{nih_root}/Data_Entry_2017.csv"},
    }
    sets = runner.parse_sets(["batch_size=4", "01.epochs=2", "02_nih_binary.seed=3"])
    p01 = runner.notebook_parameters(
        "01_kermany_densenet121", profile, sets, data_root="/d/kermany", nih_root="/d/nih"
    )
    assert p01["data_dir"] == "/d/kermany"
    assert p01["epochs"] == 2  # --set NB.key beats the profile section
    assert p01["batch_size"] == 4  # --set key beats the profile default
    assert p01["max_images_per_class"] is None
    assert p01["weights"] == "imagenet"
    assert "seed" not in p01
    p02 = runner.notebook_parameters(
        "02_nih_binary", profile, sets, data_root="/d/kermany", nih_root="/d/nih"
    )
    assert p02["data_dir"] == "/d/nih"  # notebooks named *nih* get --nih-root
    assert p02["labels"] == "/d/nih/Data_Entry_2017.csv"  # placeholder expanded
    assert p02["epochs"] == 10 and p02["seed"] == 3


def test_profile_may_override_data_dir_with_placeholder() -> None:
    profile = {"default": {"data_dir": "{data_root}/small", "note": "{keep} {notebook}"}}
    params = runner.notebook_parameters("03_x", profile, data_root="data/cx")
    assert params["data_dir"] == "data/cx/small"
    assert params["note"] == "{keep} 03_x"  # unknown braces are left alone


def test_shipped_profiles_load() -> None:
    smoke = runner.load_profile("smoke")
    assert smoke["default"] == {
        "epochs": 1,
        "max_images_per_class": 12,
        "image_size": 64,
        "batch_size": 8,
    }
    assert smoke["01_kermany_densenet121"]["weights"] is None
    assert smoke["02_nih_binary"]["weights"] is None
    full = runner.load_profile("full")
    assert full["default"] == {"epochs": 10, "max_images_per_class": None}
    assert full["01_kermany_densenet121"]["weights"] == "imagenet"
    assert runner.load_profile("none") == {}
    with pytest.raises(runner.UsageError):
        runner.load_profile("no_such_profile")


def test_discover_notebooks_by_prefix_and_name() -> None:
    names = [p.stem for p in runner.discover_notebooks(FIXTURES)]
    assert names == ["01_ok", "02_fail", "03_ok2"]
    picked = runner.discover_notebooks(FIXTURES, ["03", "01_ok"])
    assert [p.stem for p in picked] == ["01_ok", "03_ok2"]  # sorted order kept
    with pytest.raises(runner.UsageError):
        runner.discover_notebooks(FIXTURES, ["09"])


def test_unknown_notebook_is_a_usage_error(tmp_path: Path) -> None:
    argv = ["--profile", "none", "--notebooks-dir", str(FIXTURES), "--reports-dir", str(tmp_path)]
    assert runner.main([*argv, "--notebooks", "77"]) == 2
    assert runner.main([*argv, "--set", "77.epochs=1"]) == 2
    assert not (tmp_path / "index.html").exists()


def test_stale_metrics_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "x.metrics.json"
    path.write_text(json.dumps({"val_auc": 0.5}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    metrics, note = runner.read_metrics(path, not_before=time.time())
    assert metrics is None and "older" in note
    assert runner.read_metrics(path)[0] == {"val_auc": 0.5}


# --------------------------------------------------------------------------- runner: execution


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 01_ok, 02_fail, 03_ok2 once with a profile, --set overrides and a data root."""
    tmp = tmp_path_factory.mktemp("mixed")
    profile = tmp / "profile.yaml"
    profile.write_text(
        "default: {epochs: 1, max_images_per_class: 12}\n01_ok: {epochs: 2, seed: 5}\n"
    )
    reports = tmp / "reports"
    env_before = os.environ.get("PNEUMO_WEIGHTS_DIR")
    rc = runner.main(
        [
            "--profile",
            str(profile),
            "--notebooks-dir",
            str(FIXTURES),
            "--reports-dir",
            str(reports),
            "--data-root",
            "/data/from/cli",
            "--weights-dir",
            str(tmp / "weights"),
            "--set",
            "01.epochs=3",
            "--set",
            "max_images_per_class=null",
        ]
    )
    return {
        "rc": rc,
        "reports": reports,
        "tmp": tmp,
        "env_before": env_before,
        "env_after": os.environ.get("PNEUMO_WEIGHTS_DIR"),
    }


def test_failure_gives_exit_status_1_and_restores_env(mixed_run: dict) -> None:
    assert mixed_run["rc"] == 1
    assert mixed_run["env_after"] == mixed_run["env_before"]


def test_parameters_reach_the_notebook(mixed_run: dict) -> None:
    metrics = json.loads((mixed_run["reports"] / "01_ok.metrics.json").read_text())
    echo = metrics["echo"]
    assert echo["data_dir"] == "/data/from/cli"
    assert echo["epochs"] == 3  # --set 01.epochs beats the profile section (2)
    assert echo["seed"] == 5  # from the profile section
    assert echo["max_images_per_class"] is None  # --set beats the profile default
    assert echo["weights_dir_env"] == str((mixed_run["tmp"] / "weights").resolve())
    assert Path(echo["cwd"]).resolve() == Path.cwd().resolve()
    other = json.loads((mixed_run["reports"] / "03_ok2.metrics.json").read_text())["echo"]
    assert other["epochs"] == 1 and other["seed"] == 0  # profile default / notebook default


def test_failing_notebook_keeps_partial_outputs_and_next_runs(mixed_run: dict) -> None:
    reports = mixed_run["reports"]
    partial = nbformat.read(str(reports / "02_fail.ipynb"), as_version=4)
    errors = [
        out
        for cell in partial.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert errors and errors[0]["evalue"] == "boom from fixture"
    page = (reports / "02_fail.html").read_text(encoding="utf-8")
    assert "boom from fixture" in page and "ValueError" in page
    # the notebook after the failing one still ran
    assert (reports / "03_ok2.html").is_file()
    assert (reports / "03_ok2.metrics.json").is_file()


def test_index_lists_status_metrics_and_best(mixed_run: dict) -> None:
    page = (mixed_run["reports"] / "index.html").read_text(encoding="utf-8")
    for name in ("01_ok", "02_fail", "03_ok2"):
        assert f'href="{name}.html"' in page
    assert "FAILED" in page and "ValueError: boom from fixture" in page
    assert "Research use only — not for diagnostic use." in page
    assert "0.900 <small>(0.850–0.940)</small>" in page  # Model A test AUC with CI
    assert "Youden&#x27;s J on validation" in page
    assert "synthetic &lt;fixture&gt; data" in page  # strings are escaped
    assert "<script" not in page and "http" not in page  # self-contained
    # Model A (val AUC 0.95) is best, not Model B (val 0.91) despite B's higher test AUC.
    best_rows = [row for row in page.split("<tr") if "best (by validation AUC)" in row]
    assert len(best_rows) == 1 and "Model A" in best_rows[0]
    summary = json.loads((mixed_run["reports"] / "summary.json").read_text())
    nbs = summary["notebooks"]
    assert [nbs[n]["status"] for n in ("01_ok", "02_fail", "03_ok2")] == ["ok", "failed", "ok"]
    assert "boom from fixture" in nbs["02_fail"]["error"]
    assert nbs["03_ok2"]["metrics"]["val_auc"] == 0.93
    assert summary["best_by_val_auc"] == {"notebook": "01_ok", "model_index": 0}


def test_all_ok_gives_exit_status_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = runner.main(
        [
            "--profile",
            "none",
            "--notebooks-dir",
            str(FIXTURES),
            "--reports-dir",
            str(tmp_path),
            "--notebooks",
            "03",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "[1/1] 03_ok2 ..." in out and "03_ok2 ok" in out
    assert not (tmp_path / "01_ok.ipynb").exists()
    assert (tmp_path / "index.html").is_file()


def test_missing_kernel_is_a_failure_with_html(tmp_path: Path) -> None:
    argv = ["--profile", "none", "--notebooks-dir", str(FIXTURES), "--notebooks", "01"]
    assert runner.main([*argv, "--reports-dir", str(tmp_path), "--kernel", "no_such_kernel"]) == 1
    assert "no_such_kernel" in (tmp_path / "01_ok.html").read_text(encoding="utf-8")
    assert "FAILED" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_render_html_without_notebook_writes_error_page(tmp_path: Path) -> None:
    page = runner.render_html(tmp_path / "gone.ipynb", tmp_path / "gone.html", "NoSuchKernel: x")
    assert "NoSuchKernel: x" in page.read_text(encoding="utf-8")


def test_prepare_only_injects_without_executing(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumo_utils.runner",
            "--profile",
            "none",
            "--notebooks-dir",
            str(FIXTURES),
            "--reports-dir",
            str(tmp_path / "reports"),
            "--data-root",
            "rel/data",
            "--set",
            "epochs=4",
            "--prepare-only",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["01_ok.ipynb", "02_fail.ipynb", "03_ok2.ipynb"]
    nb = nbformat.read(str(out / "02_fail.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "epochs = 4" in injected[0].source
    assert f'data_dir = "{(Path.cwd() / "rel/data").resolve()}"' in injected[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------- fetch (offline)


def _make_kermany(root: Path) -> None:
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "a.jpeg").write_bytes(b"x")


def test_find_dataset_root_in_nested_download(tmp_path: Path) -> None:
    download = tmp_path / "download"
    _make_kermany(download / "chest_xray" / "__MACOSX" / "chest_xray")
    _make_kermany(download / "chest_xray" / "chest_xray")
    root = fetch.find_dataset_root(download)
    assert root == download / "chest_xray" / "chest_xray"
    only_macosx = tmp_path / "only_macosx"
    _make_kermany(only_macosx / "__MACOSX" / "chest_xray")
    with pytest.raises(FileNotFoundError):
        fetch.find_dataset_root(only_macosx)


def test_fetch_places_download_under_dest(tmp_path: Path, monkeypatch, capsys) -> None:
    download = tmp_path / "cache" / "versions" / "2"
    _make_kermany(download / "chest_xray" / "chest_xray")
    calls = []
    monkeypatch.setattr(fetch, "download", lambda handle: calls.append(handle) or download)
    assert fetch.main(["kermany", "--dest", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "chest_xray" / "test" / "PNEUMONIA" / "a.jpeg").is_file()
    assert calls == ["paultimothymooney/chest-xray-pneumonia"]
    assert fetch.main(["kermany", "--dest", str(tmp_path / "data")]) == 0
    assert calls == ["paultimothymooney/chest-xray-pneumonia"]  # already in place: no download
    assert "already in place" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionError("Failed to resolve 'api.kaggle.com'"), "no network"),
        (type("CredentialError", (Exception,), {})("no kaggle.json"), "credentials"),
        (RuntimeError("something odd"), "the download failed"),
    ],
)
def test_fetch_offline_exits_2_with_one_message(
    tmp_path: Path, monkeypatch, capsys, exc: Exception, expected: str
) -> None:
    def broken(handle: str) -> Path:
        raise exc

    monkeypatch.setattr(fetch, "download", broken)
    assert fetch.main(["kermany", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "KAGGLE_USERNAME" in err and "KAGGLE_KEY" in err and "kaggle.json" in err
    assert "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia" in err
    assert "Traceback" not in err


def test_fetch_without_any_kaggle_package(tmp_path: Path, monkeypatch, capsys) -> None:
    real_find_spec = fetch.importlib.util.find_spec
    monkeypatch.setattr(
        fetch.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("kagglehub", "kaggle") else real_find_spec(name, *a),
    )
    assert fetch.main(["nih", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kagglehub" in err and "nih-chest-xrays/data" in err


def test_best_model_link_follows_validation_auc_not_test(tmp_path):
    from pneumo_utils.runner import RunResult, link_best_model

    models_dir = tmp_path / "saved_models"
    models_dir.mkdir()
    for name in ("a", "b"):
        for suffix in (".keras", ".json", ".md"):
            (models_dir / f"{name}{suffix}").write_text(name)

    def result(name, val_auc, test_auc):
        metrics = {"models": [{"name": name, "val_auc": val_auc, "test": {"auc": test_auc},
                               "model_path": str(models_dir / f"{name}.keras")}]}
        return RunResult(name, "ok", 1.0, {}, tmp_path / f"{name}.ipynb", metrics=metrics)

    link = link_best_model([result("a", 0.90, 0.99), result("b", 0.95, 0.80)])
    assert link == models_dir / "best.keras"
    assert (models_dir / "best.keras").resolve().name == "b.keras"
    assert (models_dir / "best.json").read_text() == "b" and (models_dir / "best.md").is_symlink()
    link_best_model([result("a", 0.99, 0.5), result("b", 0.95, 0.80)])
    assert (models_dir / "best.keras").resolve().name == "a.keras"
    nih = result("a", 0.99, 0.5)
    nih.metrics["task"] = "nih:Effusion"
    link_best_model([nih, result("b", 0.95, 0.80)])
    assert (models_dir / "best.keras").resolve().name == "b.keras", "an NIH model is never the Kermany best"
