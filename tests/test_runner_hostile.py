"""Hostile profiles, run names, signals and full disks for the notebook runner (issue 22).

Most tests call :func:`pneumo_utils.runner.engine.main` in this process with ``run_notebook``
replaced by a stand-in, so no kernel starts; one test interrupts a real kernel, since what a
kernel prints when its run is stopped is the point there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumo_utils import files
from pneumo_utils.runner import engine, index_page, plan

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
LAUGHS = """\
default:
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""
"""Nested aliases: 9^6 (531,441) strings once expanded; the real attack goes two levels deeper."""


def make_kermany(root: Path) -> Path:
    """A Kermany layout with one (undecodable) file per class folder: the runner only counts."""
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "a.jpeg").write_bytes(b"x")
    return root


def main(tmp: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``engine.main`` in ``tmp`` on the fixture notebooks."""
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("PNEUMO_WEIGHTS_DIR", str(tmp))
    return engine.main(["--notebooks-dir", str(FIXTURES), *args])


def fake_run(effect=None):
    """A ``run_notebook`` stand-in: marks the notebook ok after calling ``effect(nb)``."""

    def run_notebook(nb, reports_dir, kernel, engine) -> None:
        if effect is not None:
            effect(nb)
        nb.status = "ok"

    return run_notebook


# --------------------------------------------------------------------------- YAML


def test_alias_bomb_profile_is_refused_before_expanding(tmp_path: Path, monkeypatch, error_line) -> None:
    (tmp_path / "lol.yaml").write_text(LAUGHS)
    started = time.monotonic()
    assert main(tmp_path, monkeypatch, "--profile", "lol.yaml") == 2
    assert time.monotonic() - started < 10
    assert error_line() == ("error: lol.yaml:2: anchors and aliases (&a, *a) are not allowed; "
                            "write each value out")


def test_alias_bomb_set_value_is_refused_before_expanding() -> None:
    bomb = "x=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], [*b,*b,*b,*b,*b,*b,*b,*b,*b]]"
    with pytest.raises(plan.UsageError, match=r"^--set 'x=\[&a .*: anchors and aliases"):
        plan.parse_sets([bomb])


@pytest.mark.parametrize(("text", "line", "message"), [
    ("default:\n  x: !!python/object/apply:os.system ['touch PWNED']\n", 2,
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("default: {epochs: 1}\n01_ok: {seed: [1, 2\n", 3, "fix the YAML there"),
    ("default:\n  epochs: 1\n  epochs: 2\n", 3, "'epochs' is given twice (first on line 2); keep one"),
    ("runs:\n  r1: {notebook: '01'}\n  r1: {notebook: '03'}\n", 3, "'r1' is given twice (first on line 2)"),
])
def test_bad_yaml_is_one_line_with_file_and_line(tmp_path: Path, monkeypatch, error_line,
                                                 text: str, line: int, message: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    assert main(tmp_path, monkeypatch, "--profile", "p.yaml") == 2
    got = error_line()
    assert got.startswith(f"error: p.yaml:{line}: ") and message in got, got
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "reports").exists()


def test_set_values_with_tags_or_repeated_keys_are_refused() -> None:
    with pytest.raises(plan.UsageError, match="constructor for the tag"):
        plan.parse_sets(["x=!!python/object/apply:os.system [id]"])
    with pytest.raises(plan.UsageError, match="'a' is given twice"):
        plan.parse_sets(["x={a: 1, a: 2}"])
    assert plan.parse_sets(["x=[1, 2", "y=a: b: c"]) == [(None, "x", "[1, 2"), (None, "y", "a: b: c")]


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize(("name", "clash"), [
    ("best", "best.json"),
    ("best.three_class", "best.three_class.json"),
    ("Best", "best.json"),
    ("index", "index.html"),
    ("summary", "summary.json"),
    ("01_OK", "01_ok's 01_ok.html"),
])
def test_run_names_that_overwrite_other_files_are_refused(tmp_path: Path, monkeypatch, error_line,
                                                          name: str, clash: str) -> None:
    (tmp_path / "p.yaml").write_text(f"runner: {{record_best: true}}\nruns:\n  {name}: {{notebook: '01'}}\n")
    assert main(tmp_path, monkeypatch, "--profile", "p.yaml") == 2
    got = error_line()
    assert f"profile runs.{name}: its outputs would overwrite" in got and clash in got, got


def test_runs_whose_outputs_collide_are_refused() -> None:
    notebooks = plan.read_notebooks(FIXTURES)
    with pytest.raises(plan.UsageError, match=r"runs\.r1: .*r1\.code's r1\.code\.html"):
        plan.add_runs(notebooks, {"r1": {"notebook": "01"}, "r1.code": {"notebook": "03"}})


def test_notebook_outside_the_notebooks_folder_is_refused(tmp_path: Path) -> None:
    notebooks = plan.read_notebooks(FIXTURES)
    elsewhere = tmp_path / "01_ok.py"
    elsewhere.write_text((FIXTURES / "01_ok.py").read_text())
    for target in (str(elsewhere), str(FIXTURES / ".." / "01_ok.py")):
        with pytest.raises(plan.UsageError, match=r"runs\.r1: 'notebook:' .* is not in the notebooks folder"):
            plan.add_runs(notebooks, {"r1": {"notebook": target}})
    runs = plan.add_runs(notebooks, {"r1": {"notebook": str(FIXTURES / "01_ok.py")}})
    assert [nb.of for nb in runs if nb.name == "r1"] == ["01_ok"]


def test_record_best_with_two_models_folders_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(engine, "run_notebook", fake_run())
    (tmp_path / "p.yaml").write_text("runner: {record_best: true}\n03_ok2: {models_dir: other_models}\n")
    assert main(tmp_path, monkeypatch, "--profile", "p.yaml", "--data-root", str(make_kermany(tmp_path / "d"))) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: no best.json written: its notebooks write models to 2 folders "
                   "(other_models, saved_models); best.json needs one models_dir"]
    page = (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    assert "No best model is recorded" in page and "best.json needs one models_dir" in page


# --------------------------------------------------------------------------- data


def test_data_faults_are_refused_before_any_kernel(tmp_path: Path, monkeypatch, error_line) -> None:
    def started(nb) -> None:
        raise AssertionError("a notebook started")

    monkeypatch.setattr(engine, "run_notebook", fake_run(started))
    root = make_kermany(tmp_path / "d")
    (root / "train" / "COVID").mkdir()
    assert main(tmp_path, monkeypatch, "--profile", "none", "--data-root", str(root)) == 2
    assert "holds class folder(s) COVID besides NORMAL and PNEUMONIA" in error_line()
    assert not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------- signals and full disks


def test_sigterm_leaves_the_index_interrupted(tmp_path: Path, monkeypatch, capsys) -> None:
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's handler: the runner does not handle it")

    def terminated(nb) -> None:
        if nb.name == "02_fail":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr(engine, "run_notebook", fake_run(terminated))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        rc = main(tmp_path, monkeypatch, "--profile", "none", "--data-root", str(make_kermany(tmp_path / "d")))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: {Path('reports') / 'index.html'} says which notebooks finished"]
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["state"] == "interrupted"
    assert {k: v["status"] for k, v in summary["notebooks"].items()} == {
        "01_ok": "ok", "02_fail": "interrupted", "03_ok2": "interrupted"}


def disk_full_once_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """``files.write_text_atomic`` raises ENOSPC from the moment the run is finished, as a full disk
    does."""
    write_atomic, write_index = files.write_text_atomic, index_page.write_index
    full = []

    def index(notebooks, reports_dir, run, best) -> None:
        if run["state"] == "finished":
            full.append(True)
        write_index(notebooks, reports_dir, run, best)

    def atomic(path, text) -> None:
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_atomic(path, text)

    monkeypatch.setattr(engine, "write_index", index)
    monkeypatch.setattr(files, "write_text_atomic", atomic)


def test_disk_full_at_the_end_is_one_line_and_not_running(tmp_path: Path, monkeypatch, error_line) -> None:
    monkeypatch.setattr(engine, "run_notebook", fake_run())
    disk_full_once_finished(monkeypatch)
    assert main(tmp_path, monkeypatch, "--profile", "none", "--data-root", str(make_kermany(tmp_path / "d"))) == 1
    line = error_line()
    assert line.startswith("error: could not write the run's records in reports (No space left on device)")
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["state"] == "failed" and "No space left on device" in summary["error"]
    assert all(nb["status"] == "ok" for nb in summary["notebooks"].values())


def test_write_atomic_names_the_file_a_full_disk_refused(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError) as caught:
        files.write_text_atomic(tmp_path / "index.html", "x")
    assert caught.value.filename == str(tmp_path / "index.html")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- a real kernel

SLEEPER = (FIXTURES / "03_ok2.py").read_text().partition("# %%\nimport json")[0] + (
    '# %%\nimport time\nopen("sleeping", "w").close()\ntime.sleep(120)\n')
"""A notebook whose cell says it has started (the file ``sleeping``) and then waits."""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_kernel_with_one_line(tmp_path: Path, signum: int) -> None:
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    (notebooks / "01_sleep.py").write_text(SLEEPER)
    log = tmp_path / "out.txt"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pneumo_utils.runner", "--profile", "none", "--notebooks-dir", str(notebooks),
             "--data-root", str(make_kermany(tmp_path / "d"))],
            cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True, env=environ, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (tmp_path / "sleeping").exists():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.2)
        os.killpg(process.pid, signum)  # Ctrl-C reaches the whole process group
        err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and "ZMQError" not in err and "Task exception" not in err, err
    lines = [line for line in err.splitlines() if "Kernel is running over TCP" not in line]
    assert lines == [f"interrupted: {Path('reports') / 'index.html'} says which notebooks finished"], err
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["state"] == "interrupted" and summary["notebooks"]["01_sleep"]["status"] == "interrupted"


NATIVE_WRITER = (FIXTURES / "03_ok2.py").read_text().partition("# %%\nimport json")[0] + (
    "# %%\nimport os\n"
    "os.write(2, b'E0000 00:00:1796497761.258819   27608 node_def_util.cc:682] NodeDef mentions attribute x\\n')\n"
    "os.write(2, b'I0000 00:00:1796498376.514254   28823 port.cc:153] oneDNN custom operations are on.\\n')\n"
    "os.write(2, b'a C library says something\\n')\n")
"""A notebook that writes to the kernel's own stderr as TensorFlow's C++ logging and a C library do."""


def test_kernel_stderr_reaches_the_console_without_tensorflow_log_lines(tmp_path: Path) -> None:
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    (notebooks / "01_native.py").write_text(NATIVE_WRITER)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    done = subprocess.run(
        [sys.executable, "-m", "pneumo_utils.runner", "--profile", "none", "--notebooks-dir", str(notebooks),
         "--data-root", str(make_kermany(tmp_path / "d"))],
        cwd=tmp_path, capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "a C library says something" in done.stderr
    assert "node_def_util" not in done.stderr and "oneDNN" not in done.stderr, done.stderr


@pytest.mark.parametrize("setting, expected", [
    ("epochs=-1", "epochs is -1, expected an integer >= 1"),
    ("max_images_per_class=0", "max_images_per_class is 0"),
    ("epochs=2.5", "epochs is 2.5"),
    ("02_fail.run_name=../../../outside/x", "run_name '../../../outside/x' must be a plain name"),
])
def test_parameter_values_are_checked_before_any_kernel(tmp_path: Path, monkeypatch, error_line,
                                                        setting: str, expected: str) -> None:
    make_kermany(tmp_path / "data" / "chest_xray")
    (tmp_path / "p.yaml").write_text("runner: {}\n")
    monkeypatch.setattr(engine, "run_notebook", fake_run())
    assert main(tmp_path, monkeypatch, "--profile", "p.yaml", "--offline", "--set", setting) == 2
    assert expected in error_line()


def test_a_models_folder_that_is_a_file_is_refused(tmp_path: Path, monkeypatch, error_line) -> None:
    make_kermany(tmp_path / "data" / "chest_xray")
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "p.yaml").write_text("runner: {}\n")
    monkeypatch.setattr(engine, "run_notebook", fake_run())
    assert main(tmp_path, monkeypatch, "--profile", "p.yaml", "--offline", "--set",
                f"models_dir={tmp_path / 'taken'}") == 2
    assert "which is a file, not a folder" in error_line()
