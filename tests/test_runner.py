"""Tests for the notebook runner (pneumo_utils.runner), run_all.sh and the data finder (fetch).

The runner tests execute the tiny notebooks in tests/fixtures/notebooks (jupytext .py files) with
the "python3" kernel, a few seconds each; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from filelock import FileLock

from pneumo_utils.data import fetch
from pneumo_utils.runner import engine, index_page, plan, selection

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
FULL = "runner: {record_best: true}\n"
SMOKE = "runner: {reports_dir: reports/smoke}\ndefault: {models_dir: saved_models/smoke}\n"


def make_kermany(root: Path, per_class: int = 1) -> Path:
    """An empty-image Kermany layout (the runner only checks the folders)."""
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"a{i}.jpeg").write_bytes(b"x")
    return root


def run(tmp: Path, *args: str, notebooks: Path = FIXTURES, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pneumo_utils.runner`` with ``tmp`` as the repository root (no data, no ../shared)."""
    command = [sys.executable, "-m", "pneumo_utils.runner", "--notebooks-dir", str(notebooks), *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**environ, **(env or {})})


# --------------------------------------------------------------------------- parameters


def test_set_values_are_literals_and_null_is_none() -> None:
    sets = plan.parse_sets(["01.epochs=3", "max_images_per_class=null", "flag=true", "name=abc",
                              "filters=[16, 32]", "x="])
    assert sets == [("01", "epochs", 3), (None, "max_images_per_class", None), (None, "flag", True),
                    (None, "name", "abc"), (None, "filters", [16, 32]), (None, "x", "")]
    for bad in ("no_equals_sign", "x y=1", "y\nimport os; os.system('id')\nx=1", "01.=3"):
        with pytest.raises(plan.UsageError):
            plan.parse_sets([bad])
    with pytest.raises(plan.UsageError, match="not a number, string"):
        plan.parse_sets(["when=2020-01-01"])  # YAML date: not a literal papermill writes


def test_shipped_profiles_only_set_declared_parameters() -> None:
    notebooks = plan.read_notebooks(ROOT / "notebooks")
    full, smoke = plan.load_profile("full"), plan.load_profile("smoke")
    for profile in (full, smoke):
        plan.assign_parameters(plan.add_runs(notebooks, profile.get("runs") or {}), profile, [], {})
    assert full["runner"]["record_best"] is True and "record_best" not in smoke["runner"]
    assert smoke["runner"]["reports_dir"] != "reports"
    assert smoke["default"]["models_dir"] != "saved_models"


def test_unknown_key_is_an_error_listing_known_keys(tmp_path: Path) -> None:
    done = run(tmp_path, "--profile", "none", "--data-root", str(make_kermany(tmp_path / "d")),
               "--set", "epoch=3")
    assert done.returncode == 2
    assert "no notebook declares 'epoch'" in done.stderr and "epochs" in done.stderr
    done = run(tmp_path, "--profile", "none", "--set", "02.weights=imagenet")
    assert done.returncode == 2 and "02_fail declares no 'weights'" in done.stderr
    assert not (tmp_path / "reports").exists()


def test_injection_through_a_profile_key_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "evil.yaml"
    profile.write_text('default: {"seed = 1\\nopen(\'PWNED\', \'w\')\\nx": 1}\n')
    done = run(tmp_path, "--profile", str(profile), "--data-root", str(make_kermany(tmp_path / "d")))
    assert done.returncode == 2 and "no notebook declares" in done.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """01_ok, 02_fail and 03_ok2 once, with a profile, --set overrides and a hostile value."""
    tmp = tmp_path_factory.mktemp("mixed")
    (tmp / "profile.yaml").write_text(
        FULL + "default: {epochs: 1, max_images_per_class: 12}\n01_ok: {epochs: 2, seed: 5}\n"
    )
    hostile = 'a"; open("PWNED", "w"); "\\'
    done = run(tmp, "--profile", str(tmp / "profile.yaml"), "--data-root", str(make_kermany(tmp / "d")),
               "--weights-dir", str(tmp / "weights"), "--set", "01.epochs=3",
               "--set", "max_images_per_class=null", "--set", f"03.data_dir={hostile}")
    return {"done": done, "tmp": tmp, "reports": tmp / "reports", "hostile": hostile}


def test_parameters_reach_the_notebook_as_literals(mixed_run: dict) -> None:
    reports = mixed_run["reports"]
    echo = json.loads((reports / "01_ok.metrics.json").read_text())["echo"]
    assert echo["data_dir"] == str(mixed_run["tmp"] / "d")
    assert echo["epochs"] == 3 and echo["seed"] == 5  # --set NB.key over the profile section
    assert echo["max_images_per_class"] is None  # --set x=null is papermill's -p x None
    assert echo["weights_dir_env"] == str((mixed_run["tmp"] / "weights").resolve())
    assert Path(echo["cwd"]).resolve() == mixed_run["tmp"].resolve()  # papermill cwd: the root
    other = json.loads((reports / "03_ok2.metrics.json").read_text())["echo"]
    assert other["data_dir"] == mixed_run["hostile"]  # arrives as the string it was
    assert not (mixed_run["tmp"] / "PWNED").exists()


def test_failure_gives_status_1_and_keeps_going(mixed_run: dict) -> None:
    done, reports = mixed_run["done"], mixed_run["reports"]
    assert done.returncode == 1
    assert "[2/3] 02_fail FAILED: ValueError: boom from fixture" in done.stdout
    assert "Train and write metrics" in done.stdout  # the section being run is shown
    partial = nbformat.read(str(reports / "02_fail.ipynb"), as_version=4)
    errors = [o for c in partial.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and errors[0]["evalue"] == "boom from fixture"
    assert "boom from fixture" in (reports / "02_fail.html").read_text(encoding="utf-8")
    assert (reports / "03_ok2.html").is_file()


def test_index_tells_what_happened(mixed_run: dict) -> None:
    reports = mixed_run["reports"]
    page = (reports / "index.html").read_text(encoding="utf-8")
    assert 'class="failed">failed' in page and "ValueError: boom from fixture" in page
    for name in ("01_ok", "02_fail", "03_ok2"):
        assert f'href="{name}.html"' in page and f'href="{name}.code.html"' in page
    assert "Research use only: not for diagnostic use." in page
    assert "0.900 (0.850–0.920)" in page  # Model A's test AUC with its CI
    assert "random initialisation" in page and "ImageNet (resnet50_notop.h5)" in page
    assert "NORMAL / PNEUMONIA" in page  # no positive_class: the notebook's class names
    roc = 'class="roc" role="img" aria-label="ROC curves on the test split: Kermany: pneumonia vs normal"><svg'
    assert page.count(roc) == 1  # one figure for the table, drawn from the metrics' points
    assert "Model A (AUC = 0.90)" in page and "Model B (AUC = 0.97)" in page and "Chance level" in page
    assert "<script" not in page
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["state"] == "finished"
    assert [summary["notebooks"][n]["status"] for n in ("01_ok", "02_fail", "03_ok2")] == ["ok", "failed", "ok"]


def test_report_opens_with_summary_and_hides_setup(mixed_run: dict) -> None:
    reports = mixed_run["reports"]
    short = (reports / "01_ok.html").read_text(encoding="utf-8")
    full = (reports / "01_ok.code.html").read_text(encoding="utf-8")
    assert "<title>01_ok</title>" in short
    assert 'href="index.html"' in short and 'href="01_ok.code.html"' in short
    assert "Summary: Fixture two-model run" in short and "Youden" in short
    assert "synthetic &lt;fixture&gt; data" in short  # metrics text is escaped
    assert ".cache/pneumo" not in short  # the parameters cell's input is hidden
    assert ".cache/pneumo" in full
    code = '<span class="n">entries</span>'
    assert code in short and code in full  # the notebook's own code stays visible


def test_best_follows_validation_and_skips_random_fallback(mixed_run: dict) -> None:
    best = json.loads((mixed_run["tmp"] / "saved_models" / "best.json").read_text())
    # Model B has the higher validation AUC but fell back to random weights: not eligible
    assert best["model"] == "Model_A.keras" and best["selection_rule"] == "validation AUC"
    assert not (mixed_run["tmp"] / "saved_models" / "best.json").is_symlink()


def test_smoke_run_leaves_best_and_full_reports_alone(mixed_run: dict) -> None:
    tmp = mixed_run["tmp"]
    before = (tmp / "saved_models" / "best.json").read_bytes()
    index_before = (tmp / "reports" / "index.html").read_bytes()
    (tmp / "smoke.yaml").write_text(SMOKE)
    done = run(tmp, "--profile", str(tmp / "smoke.yaml"), "--notebooks", "01",
               "--data-root", str(tmp / "d"))
    assert done.returncode == 0, done.stderr
    assert (tmp / "saved_models" / "smoke" / "Model_A.keras").is_file()
    assert (tmp / "reports" / "smoke" / "01_ok.html").is_file()
    assert (tmp / "saved_models" / "best.json").read_bytes() == before
    assert (tmp / "reports" / "index.html").read_bytes() == index_before
    assert not (tmp / "saved_models" / "smoke" / "best.json").exists()


def test_selection_score_wins_over_validation_auc(tmp_path: Path) -> None:
    entries = []
    for name, score, val_auc in (("a", 0.7, 0.99), ("b", 0.9, 0.90)):
        (tmp_path / f"{name}.keras").write_text(name)
        entries.append({"name": name, "weights": "w.h5", "validation": {"auc": val_auc},
                        "selection_score": score, "selection_rule": "mean AUC under shift",
                        "model_path": str(tmp_path / f"{name}.keras")})
    nb = plan.Notebook("04_x", tmp_path, None, {}, metrics={"models": entries})
    nih = plan.Notebook("02_nih", tmp_path, None, {}, metrics={
        "task": "nih:Effusion", "models": [{**entries[0], "name": "n", "selection_score": 5.0}]})
    best = selection.choose_best([nb, nih])
    assert best["name"] == "b" and best["rule"] == "mean AUC under shift"


def test_external_validation_auc_wins_over_the_selection_score(tmp_path: Path) -> None:
    entries = []
    for name, score, external_auc in (("a", 0.95, 0.90), ("b", 0.80, 0.96), ("c", 0.99, None)):
        (tmp_path / f"{name}.keras").write_text(name)
        external = {"auc": external_auc, "data": "site A"} if external_auc else None
        entries.append({"name": name, "weights": "w.h5", "validation": {"auc": 0.99},
                        "selection_score": score, "selection_rule": "worst balanced accuracy",
                        "external": external, "model_path": str(tmp_path / f"{name}.keras")})
    nb = plan.Notebook("04_x", tmp_path, None, {}, metrics={"models": entries})
    best = selection.choose_best([nb])
    assert best["name"] == "b" and best["rule"] == selection.EXTERNAL_RULE
    assert best["rule_data"] == "site A" and best["rule_value"] == 0.96
    pointer = json.loads(selection.write_best({**best, "pointer": None}, tmp_path).read_text())
    assert pointer["selection_data"] == "site A" and pointer["selection_value"] == 0.96
    row = index_page.model_row(nb, entries[1])
    assert row["external"]["auc"] == "0.960" and index_page.model_row(nb, entries[2])["external"] is None


def test_edited_py_is_what_runs_and_index_says_running(tmp_path: Path) -> None:
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    source = (FIXTURES / "03_ok2.py").read_text()
    edited = source.replace(
        '"echo": echo,',
        '"echo": {**echo, "edited": True, "index": Path(reports_dir, "index.html").read_text()},',
    )
    assert edited != source
    (notebooks / "03_ok2.py").write_text(edited)
    done = run(tmp_path, "--profile", "none", "--data-root", str(make_kermany(tmp_path / "d")),
               notebooks=notebooks)
    assert done.returncode == 0, done.stderr
    echo = json.loads((tmp_path / "reports" / "03_ok2.metrics.json").read_text())["echo"]
    assert echo["edited"] is True
    assert 'class="running">running' in echo["index"]  # written before the notebook ran


def test_second_runner_on_the_same_folders_is_refused(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    with FileLock(str(tmp_path / "reports" / ".runner.lock")):
        done = run(tmp_path, "--profile", "none", "--data-root", str(make_kermany(tmp_path / "d")))
    assert done.returncode == 2 and "another run is writing to" in done.stderr
    assert not (tmp_path / "reports" / "index.html").exists()


def test_render_failure_is_a_notebook_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbconvert

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nbconvert.HTMLExporter, "from_notebook_node", disk_full)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PNEUMO_WEIGHTS_DIR", str(tmp_path))
    rc = engine.main(["--profile", "none", "--notebooks-dir", str(FIXTURES), "--notebooks", "03",
                      "--data-root", str(make_kermany(tmp_path / "d"))])
    assert rc == 1
    assert sorted(p.name for p in (tmp_path / "reports").glob("*.html")) == ["index.html"]
    assert not list((tmp_path / "reports").glob(".*.tmp"))
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "report not written: OSError: [Errno 28] No space left on device" in page
    assert 'class="failed">failed' in page


def test_offline_without_data_fails_once_before_any_kernel(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run(tmp_path, "--profile", "none", "--offline")
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert "data is missing (needed by 01_ok, 02_fail, 03_ok2" in done.stderr
    assert "--data-root DIR" in done.stderr and "kagglehub" in done.stderr
    assert not (tmp_path / "reports").exists()
    assert time.monotonic() - started < 60


# --------------------------------------------------------------------------- profile runs and tasks

TASKS = Path(__file__).parent / "fixtures" / "task_notebooks"
RUNS = FULL + """\
default: {epochs: 1}
01_task_model: {epochs: 2, seed: 5, backbone: mobilenetv2}
runs:
  01_bvv:
    notebook: 01_task_model
    task: bacterial_vs_viral
    backbone: resnet50
  01_bogus:
    notebook: 01_task_model
    task: bogus
  01_bvv_small:
    notebook: "01"
    task: bacterial_vs_viral
    seed: 9
  01_three:
    notebook: 01_task_model
    task: three_class
"""


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fixture notebook 01_task_model and four runs of it (one failing), in a full profile."""
    tmp = tmp_path_factory.mktemp("tasks")
    (tmp / "profile.yaml").write_text(RUNS)
    done = run(tmp, "--profile", str(tmp / "profile.yaml"), "--data-root", str(make_kermany(tmp / "d")),
               "--set", "01_task_model.epochs=3", "--set", "01_three.epochs=4", "--set", "seed=7",
               notebooks=TASKS)
    reports = tmp / "reports"
    echo = {path.name.removesuffix(".metrics.json"): json.loads(path.read_text())["echo"]
            for path in reports.glob("*.metrics.json")}
    return {"done": done, "tmp": tmp, "reports": reports, "echo": echo}


def test_runs_follow_their_notebook_with_their_own_names(task_run: dict) -> None:
    done, reports = task_run["done"], task_run["reports"]
    assert done.returncode == 1  # 01_bogus failed
    names = ["01_task_model", "01_bvv", "01_bogus", "01_bvv_small", "01_three"]
    for i, name in enumerate(names, start=1):
        assert f"[{i}/5] {name} " in done.stdout
    assert "[3/5] 01_bogus FAILED: KeyError: 'bogus'" in done.stdout
    for name in names:
        assert (reports / f"{name}.html").is_file() and (reports / f"{name}.code.html").is_file()
        assert (reports / f"{name}.ipynb").is_file()
    assert sorted(task_run["echo"]) == sorted(set(names) - {"01_bogus"})
    assert all(echo["run_name"] == name for name, echo in task_run["echo"].items())  # run_name injected
    assert "<title>01_three</title>" in (reports / "01_three.html").read_text(encoding="utf-8")
    summary = json.loads((reports / "summary.json").read_text())
    assert list(summary["notebooks"]) == names
    assert summary["notebooks"]["01_bvv"]["of"] == "01_task_model"
    assert summary["notebooks"]["01_bogus"]["status"] == "failed"


def test_run_parameters_merge_in_order(task_run: dict) -> None:
    echo = task_run["echo"]
    data_dir = str(task_run["tmp"] / "d")
    # notebook section < run's own keys < --set KEY < --set NB.KEY < --set RUN.KEY
    assert echo["01_task_model"] == {"data_dir": data_dir, "task": "pneumonia", "backbone": "mobilenetv2",
                                     "epochs": 3, "seed": 7, "run_name": "01_task_model"}
    assert echo["01_bvv"] | {"run_name": None} == {"data_dir": data_dir, "task": "bacterial_vs_viral",
                                                   "backbone": "resnet50", "epochs": 3, "seed": 7, "run_name": None}
    assert echo["01_bvv_small"]["backbone"] == "mobilenetv2" and echo["01_bvv_small"]["seed"] == 7
    assert echo["01_three"]["task"] == "three_class" and echo["01_three"]["epochs"] == 4


def test_index_has_one_table_per_task(task_run: dict) -> None:
    page = (task_run["reports"] / "index.html").read_text(encoding="utf-8")
    titles = ["Kermany: pneumonia vs normal", "Kermany: bacterial vs viral pneumonia (PNEUMONIA images only)",
              "Kermany: normal vs bacterial vs viral pneumonia", "Run settings"]
    models = page.index("<h2>Models</h2>")
    starts = [page.index(f">{t}</h", models) for t in titles]
    assert starts == sorted(starts)  # in the order of their task keys
    headlines = page[page.index('id="headlines"'):models]  # the first screen: one card per task
    assert [headlines.index(f">{t}</h3>") for t in titles[:3]] == sorted(headlines.index(f">{t}</h3>") for t in titles[:3])
    assert headlines.count('class="card"') == 3 and "Same-source hold-out" in headlines
    pneumonia, binary, three = (page[a:b] for a, b in zip(starts, starts[1:], strict=False))
    for column in ("test macro AUC", "balanced accuracy", "macro F1", "argmax (no threshold)",
                   "0.642 (0.590–0.690)", "NORMAL / BACTERIAL PNEUMONIA / VIRAL PNEUMONIA"):
        assert column in three
    assert "sensitivity" not in three and "<svg" not in three  # no ROC points: no figure
    assert "VIRAL PNEUMONIA" in binary and "0.400" in binary
    assert binary.count("<svg") == 1 and binary.count("(AUC = 0.88)</text>") == 2  # both models, one figure
    assert "mobilenetv2 pneumonia" in pneumonia and "bacterial_vs_viral" not in pneumonia
    assert page.count('class="best"') == 3 and "run of 01_task_model" in page
    short = (task_run["reports"] / "01_three.html").read_text(encoding="utf-8")
    assert "balanced accuracy 0.660 (0.600–0.710)" in short and "argmax, no threshold" in short


def test_best_is_chosen_per_kermany_task(task_run: dict) -> None:
    models = task_run["tmp"] / "saved_models"
    expected = {"best.json": ("kermany", "01_task_model"),
                "best.bacterial_vs_viral.json": ("kermany:bacterial_vs_viral", "01_bvv"),
                "best.three_class.json": ("kermany:three_class", "01_three")}
    assert sorted(p.name for p in models.glob("best*.json")) == sorted(expected)
    for file, (task, notebook) in expected.items():
        pointer = json.loads((models / file).read_text())
        assert (pointer["task"], pointer["notebook"], pointer["model"]) == (task, notebook, f"{notebook}.keras")
        assert pointer["selection_rule"] == "validation AUC"
    summary = json.loads((task_run["reports"] / "summary.json").read_text())
    assert {t: b["notebook"] for t, b in summary["best"].items()} == {t: n for t, n in expected.values()}
    page = (task_run["reports"] / "index.html").read_text(encoding="utf-8")
    headlines = page[page.index('id="headlines"'):page.index("<h2>Models</h2>")]
    assert headlines.count("best by validation AUC") == 3  # each card names its rule
    bvv = headlines[headlines.index(">Kermany: bacterial vs viral pneumonia (PNEUMONIA images only)</h3>"):]
    assert bvv.index("<b>resnet50") < bvv.index("</div>")  # the task's best model leads its card
    assert "0.810 (0.750–0.860)" in page  # the three-class table, with its CI


def test_runs_are_selected_and_prepared_by_name(tmp_path: Path) -> None:
    (tmp_path / "profile.yaml").write_text(RUNS)
    common = ["--profile", str(tmp_path / "profile.yaml"), "--data-root", str(make_kermany(tmp_path / "d"))]
    done = run(tmp_path, *common, "--notebooks", "01_three", "--prepare-only", "only", notebooks=TASKS)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["01_three.ipynb"]
    source = "".join(c.source for c in nbformat.read(str(tmp_path / "only" / "01_three.ipynb"), as_version=4).cells)
    assert 'run_name = "01_three"' in source and 'task = "three_class"' in source
    done = run(tmp_path, *common, "--notebooks", "01", "--prepare-only", "all", notebooks=TASKS)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "all").glob("*.ipynb"))) == 5


@pytest.mark.parametrize(("runs", "message"), [
    ("r1: {notebook: 03_ok2, task: three_class}", "profile runs.r1.task: 03_ok2 declares no 'task'; known: data_dir"),
    ("r1: {task: three_class}", "profile runs.r1: 'notebook:' must name one notebook"),
    ("r1: {notebook: '0'}", "profile runs.r1: 'notebook:' must name one notebook"),
    ("01_ok: {notebook: '01'}", "profile runs.01_ok: a run needs a name of its own"),
    ("../r1: {notebook: '01'}", "a run needs a name of its own"),
])
def test_bad_runs_are_usage_errors(tmp_path: Path, monkeypatch, capsys, runs: str, message: str) -> None:
    (tmp_path / "profile.yaml").write_text(f"runs:\n  {runs}\n")
    monkeypatch.chdir(tmp_path)
    rc = engine.main(["--profile", "profile.yaml", "--notebooks-dir", str(FIXTURES),
                      "--data-root", str(make_kermany(tmp_path / "d"))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "reports").exists()


def test_run_of_a_notebook_without_run_name_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    (notebooks / "03_ok2.py").write_text((FIXTURES / "03_ok2.py").read_text().replace('run_name = "03_ok2"', ""))
    (tmp_path / "profile.yaml").write_text("runs:\n  r1: {notebook: '03'}\n")
    monkeypatch.chdir(tmp_path)
    assert engine.main(["--profile", "profile.yaml", "--notebooks-dir", str(notebooks)]) == 2
    err = capsys.readouterr().err
    assert "profile runs.r1 (a run's outputs are named by run_name): 03_ok2 declares no 'run_name'" in err


def test_old_metrics_without_task_still_render(tmp_path: Path) -> None:
    old = plan.Notebook("03_old", tmp_path, None, {}, status="ok",
                          metrics={"val_auc": 0.9, "test": {"auc": 0.8}, "threshold": 0.5})
    odd = plan.Notebook("04_odd", tmp_path, None, {}, status="ok",
                          metrics={"task": "nih:Effusion", "models": [{"name": "n", "test": "garbage"}, 3]})
    run_info = {"state": "finished", "profile": "none", "commit": "x", "started": "now", "settings": {}}
    index_page.write_index([old, odd], tmp_path, run_info, {})
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<h3>Kermany: pneumonia vs normal</h3>" in page and "<h3>NIH ChestX-ray14: Effusion vs no Effusion</h3>" in page
    assert "0.800" in page and "–" in page and "argmax" not in page.split("<h2>Models</h2>")[1].split("<h3>")[1]
    assert "<svg" not in page  # no model carries ROC points
    assert index_page.task_key("bacterial_vs_viral") == "kermany:bacterial_vs_viral"
    assert index_page.task_key("kermany:pneumonia") == index_page.task_key(None) == "kermany"


def roc_row(name: str, fpr: list, tpr: list, auc: float | None = 0.9) -> dict:
    """A models-table row as :func:`index_page.model_row` gives it, for the ROC figure."""
    return {"name": name, "roc": {"fpr": fpr, "tpr": tpr}, "test_auc_value": auc}


def svg_texts(svg: str) -> list[str]:
    """The text elements of an inline SVG figure (it must parse as XML)."""
    import xml.etree.ElementTree as ET

    return ["".join(t.itertext()) for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]


def test_roc_figure_draws_the_finite_points_of_each_model() -> None:
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    rows = [roc_row("finite", [0.0, 0.1, 1.0], [0.0, 0.8, 1.0]),
            roc_row("gaps", [0.0, float("nan"), None, "x", 0.3, 1.0], [0.0, 0.5, 0.6, 0.7, float("inf"), 1.0], auc=None),
            roc_row("all missing", [None, float("nan")], [0.1, 0.2]),
            {"name": "no points", "roc": None, "test_auc_value": 0.7},
            {"name": "not lists", "roc": {"fpr": "0,1", "tpr": {}}, "test_auc_value": 0.7}]
    texts = svg_texts(index_page.roc_figure(rows, "kermany"))
    assert "false positive rate (test split)" in texts and "true positive rate" in texts
    assert "finite (AUC = 0.90)" in texts and "gaps" in texts  # no AUC, no figure in the label
    assert any(t.startswith("Chance level") for t in texts)  # the diagonal
    assert not any(t.startswith(("all missing", "no points", "not lists")) for t in texts)
    assert plt.get_fignums() == open_before  # nothing left open in pyplot
    assert index_page.roc_figure(rows[2:], "kermany") is None
    assert index_page.roc_figure([], "kermany") is None


def test_roc_figure_keeps_names_as_text_and_ids_apart() -> None:
    hostile = '</text></svg><script>alert(1)</script> --> $\\frac{$ & "q"'
    rows = [roc_row(hostile, [0.0, 1.0], [0.0, 1.0]), roc_row("_hidden", [0.0, 1.0], [0.0, 1.0], auc=0.5)]
    first, second = index_page.roc_figure(rows, "kermany"), index_page.roc_figure(rows, "nih:Effusion")
    assert "<script" not in first
    texts = svg_texts(first)
    assert f"{hostile} (AUC = 0.90)" in texts  # escaped, not read as mathematics
    assert " _hidden (AUC = 0.50)" in texts  # a leading _ would hide it from the legend
    ids = [re.findall(r' id="([^"]+)"', svg) for svg in (first, second)]
    assert ids[0] and len(set(ids[0])) == len(ids[0]) and not set(ids[0]) & set(ids[1])


def test_long_roc_curve_is_thinned() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20_000)
    fpr, tpr, _ = roc_curve(labels, labels + rng.normal(0, 1.5, labels.size), drop_intermediate=False)
    assert len(fpr) > 10 * index_page.MAX_ROC_POINTS
    svg = index_page.roc_figure([roc_row("long", fpr.tolist(), tpr.tolist())], "kermany")
    vertices = max(path.count("L ") for path in re.findall(r' d="([^"]*)"', svg))
    assert 10 < vertices <= index_page.MAX_ROC_POINTS  # drawn all 20,001 points give about 1,900
    assert "long (AUC = 0.90)" in svg_texts(svg)


# --------------------------------------------------------------------------- run_all.sh


def test_help_needs_no_virtual_environment(tmp_path: Path) -> None:
    copy = tmp_path / "clone"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "run_all.sh", copy)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", copy / "scripts")
    done = subprocess.run(["bash", "run_all.sh", "--help"], cwd=copy, capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "Usage: ./run_all.sh" in done.stdout and "--smoke" in done.stdout
    assert not (copy / ".venv").exists() and "[setup]" not in done.stdout


def test_absolute_venv_path_is_used(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    copy = tmp_path / "clone"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", copy / "scripts")
    (copy / "pyproject.toml").write_text("")
    (venv / ".pneumo-installed").touch()
    os.utime(copy / "pyproject.toml", (0, 0))
    done = subprocess.run(["bash", "-c", "source scripts/bootstrap.sh && command -v python"], cwd=copy,
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "PNEUMO_VENV": str(venv)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(venv / "bin" / "python")


# --------------------------------------------------------------------------- fetch (offline)


def test_locate_prefers_data_then_shared(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert fetch.locate("kermany", base=repo) is None
    shared = make_kermany(tmp_path / "shared" / "data" / "chest_xray")
    assert fetch.locate("kermany", base=repo).resolve() == shared
    local = make_kermany(repo / "data" / "chest_xray")
    assert fetch.locate("kermany", base=repo) == local
    with pytest.raises(fetch.FetchError, match="expected"):
        fetch.locate("kermany", explicit=tmp_path / "nowhere", base=repo)
    (repo / "data" / "nih_sample" / "images").mkdir(parents=True)
    (repo / "data" / "nih_sample" / "sample_labels.csv").write_text("Image Index\n")
    (repo / "data" / "nih_sample" / "images" / "00000001_000.png").write_bytes(b"x")
    assert fetch.locate("nih", base=repo) == repo / "data" / "nih_sample"


def test_find_dataset_root_in_nested_download(tmp_path: Path) -> None:
    download = tmp_path / "download"
    make_kermany(download / "chest_xray" / "__MACOSX" / "chest_xray")
    make_kermany(download / "chest_xray" / "chest_xray")
    assert fetch.find_dataset_root(download) == download / "chest_xray" / "chest_xray"
    only_macosx = tmp_path / "only_macosx"
    make_kermany(only_macosx / "__MACOSX" / "chest_xray")
    with pytest.raises(FileNotFoundError):
        fetch.find_dataset_root(only_macosx)


def test_fetch_places_and_counts_download(tmp_path: Path, monkeypatch, capsys) -> None:
    download = tmp_path / "cache" / "versions" / "2"
    make_kermany(download / "chest_xray" / "chest_xray", per_class=2)
    calls = []
    monkeypatch.setattr(fetch, "download", lambda handle: calls.append(handle) or download)
    assert fetch.main(["kermany", "--dest", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "chest_xray" / "test" / "PNEUMONIA" / "a1.jpeg").is_file()
    assert "test/PNEUMONIA 2" in capsys.readouterr().out
    assert fetch.main(["kermany", "--dest", str(tmp_path / "data")]) == 0
    assert calls == ["paultimothymooney/chest-xray-pneumonia"]  # in place: no second download


def test_nih_sample_gets_an_images_folder(tmp_path: Path, monkeypatch) -> None:
    download = tmp_path / "cache"
    (download / "sample" / "images").mkdir(parents=True)
    (download / "sample" / "images" / "00000001_000.png").write_bytes(b"x")
    (download / "sample_labels.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    monkeypatch.setattr(fetch, "download", lambda handle: download)
    final = fetch.fetch("nih-sample", tmp_path / "data")
    assert final == tmp_path / "data" / "nih_sample"
    assert (final / "images" / "00000001_000.png").is_file() and fetch.is_nih_root(final)


@pytest.mark.parametrize(("exc", "expected"), [
    (ConnectionError("Failed to resolve 'www.kaggle.com'"), "no network"),
    (ModuleNotFoundError("No module named 'kagglehub'"), "pip install kagglehub"),
    (RuntimeError("HTTP 500"), "the download failed"),
])
def test_fetch_failure_is_one_message(tmp_path: Path, monkeypatch, capsys, exc, expected) -> None:
    def broken(handle: str) -> Path:
        raise exc

    monkeypatch.setattr(fetch, "download", broken)
    assert fetch.main(["kermany", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "--data-root DIR" in err and "Traceback" not in err


def test_reports_leave_out_tensorflow_native_log_lines() -> None:
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\r\n"
             "I0000 00:00:1796176214.935607    5176 port.cc:153] oneDNN custom operations are on.\n"
             "E0000 00:00:1796176302.549381    5176 node_def_util.cc:682] NodeDef mentions attribute x\n")
    cell = nbformat.v4.new_code_cell("import tensorflow")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=noise),
                    nbformat.v4.new_output("stream", name="stdout", text=noise + "epoch 1: auc 0.91\n")]
    notebook = nbformat.v4.new_notebook(cells=[cell])
    engine.drop_native_log_lines(notebook)
    assert [o["text"] for o in notebook.cells[0].outputs] == ["epoch 1: auc 0.91\n"]


def test_forward_stderr_drops_only_tensorflow_native_log_lines() -> None:
    read, write = os.pipe()
    with os.fdopen(write, "wb") as pipe:
        pipe.write(b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                   b"E0000 00:00:1796497761.258819   27608 node_def_util.cc:682] NodeDef mentions attribute\n"
                   b"Fatal Python error: Segmentation fault\n")
    out = io.StringIO()
    engine.forward_stderr(os.fdopen(read, "rb"), to=out)
    assert out.getvalue() == "Fatal Python error: Segmentation fault\n"


def test_external_roc_figure_is_labelled_with_the_external_auc() -> None:
    rows = [{"name": "m", "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}, "test_auc_value": 0.99,
             "external_roc": {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.9, 1.0]}, "external_auc": 0.93}]
    texts = svg_texts(index_page.roc_figure(rows, "kermany", split="external"))
    assert "m (AUC = 0.93)" in texts and "false positive rate (external validation)" in texts
    assert "m (AUC = 0.99)" in svg_texts(index_page.roc_figure(rows, "kermany"))
    assert index_page.roc_figure([{**rows[0], "external_roc": None}], "kermany", split="external") is None
