"""What the runner reads and sends: metrics files bounded before the index draws them, parameter
values checked before a kernel starts, and a kernel shut down without a SIGINT."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from pneumo_utils.runner import engine, index_page, plan

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
ROC = {"fpr": [i / 100 for i in range(101)], "tpr": [min(1.0, i / 50) for i in range(101)]}


def models_json(n: int, roc: dict | None = ROC) -> str:
    """A metrics JSON with ``n`` Kermany model entries, each with the test ROC curve ``roc``."""
    return json.dumps({"task": "kermany", "models": [
        {"name": f"model {i}", "validation": {"auc": 0.9}, "test": {"auc": 0.9, "roc": roc}} for i in range(n)]})


HOSTILE = {
    "10,000 models": (models_json(10_000, roc=None), "lists 10,000 models, more than 50"),
    "10,000 models with ROC curves": (models_json(10_000), "larger than 2 MiB"),
    "100,000 nested arrays": ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
    "3 MiB": (json.dumps({"models": [], "pad": "x" * 3 * 2**20}), "larger than 2 MiB"),
    "a list": ("[1, 2]", "is not a JSON object"),
    "cut short": ('{"models": [', "is not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metrics_are_named_not_read(tmp_path: Path, case: str) -> None:
    text, reason = HOSTILE[case]
    path = tmp_path / "01_x.metrics.json"
    path.write_text(text)
    started = time.monotonic()
    metrics, problem = engine.read_metrics(path)
    assert time.monotonic() - started < 5
    assert metrics is None and problem.startswith("01_x.metrics.json ") and reason in problem, problem


def test_a_metrics_file_within_the_bounds_is_read(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(models_json(engine.MAX_METRICS_MODELS))
    metrics, problem = engine.read_metrics(tmp_path / "m.json")
    assert problem is None and len(metrics["models"]) == engine.MAX_METRICS_MODELS
    assert engine.read_metrics(tmp_path / "absent.json") == (None, None)


@pytest.mark.parametrize("case", ["10,000 models", "100,000 nested arrays"])
def test_the_run_goes_on_and_the_index_names_the_file(tmp_path: Path, monkeypatch, case: str) -> None:
    """``run_notebook`` as it runs, with papermill's kernel replaced by writing the metrics file."""
    import papermill

    def execute(node, output, parameters, **kwargs) -> None:
        Path(output).with_suffix(".metrics.json").write_text(HOSTILE[case][0])  # reports/01_ok.metrics.json

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PNEUMO_WEIGHTS_DIR", str(tmp_path))
    started = time.monotonic()
    status = engine.main(["--notebooks-dir", str(FIXTURES), "--profile", "none", "--notebooks", "01",
                          "--set", "data_dir=."])
    assert time.monotonic() - started < 60
    assert status == 0
    page = (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    assert "metrics not shown: 01_ok.metrics.json " in page and HOSTILE[case][1] in page
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["notebooks"]["01_ok"]["status"] == "ok"
    assert HOSTILE[case][1] in summary["notebooks"]["01_ok"]["metrics_problem"]


def test_one_figure_draws_at_most_max_roc_curves() -> None:
    rows = [{"name": f"model {i:02d}", "roc": ROC, "test_auc_value": 0.9} for i in range(30)]
    svg = index_page.roc_figure(rows, "kermany")
    last = index_page.MAX_ROC_CURVES - 1
    assert f"model {last:02d}" in svg and f"model {last + 1:02d}" not in svg


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(("setting", "expected"), [
    ("epochs=-1", "epochs is -1, expected an integer >= 1"),
    ("max_images_per_class=0", "max_images_per_class is 0, expected null or an integer >= 2"),
    ("image_size=16", "image_size is 16, expected an integer from 32 to 512 (pixels)"),
    ("scratch_image_size=1000", "scratch_image_size is 1000"),
    ("unfreeze_layers=0", "unfreeze_layers is 0, expected null or an integer >= 1"),
    ("remove_cues='no'", "remove_cues is 'no', expected true or false"),
    ("models_dir=<file>", "which is a file, not a folder"),
])
def test_the_notebooks_values_are_refused_before_any_kernel(tmp_path: Path, setting: str, expected: str) -> None:
    (tmp_path / "taken").write_text("a file")
    notebooks = plan.read_notebooks(NOTEBOOKS)
    sets = plan.parse_sets([setting.replace("<file>", str(tmp_path / "taken"))])
    with pytest.raises(plan.UsageError, match="fix the profile or --set value") as caught:
        plan.assign_parameters(notebooks, {}, sets, {})
    assert expected in str(caught.value)


def test_every_numeric_or_true_false_parameter_has_a_rule() -> None:
    """A new number or switch in a notebook's parameters cell needs its range in ``VALUE_RULES``."""
    missing = {(nb.name, key) for nb in plan.read_notebooks(NOTEBOOKS) for key, spec in nb.declared.items()
               if {"int", "float", "bool"} & set(spec["inferred_type_name"].split("|"))
               and key not in plan.VALUE_RULES}
    assert not missing


def test_a_notebook_without_a_kernelspec_is_one_line(tmp_path: Path, monkeypatch, error_line) -> None:
    (tmp_path / "01_bare.py").write_text('# %% tags=["parameters"]\nseed = 0\n')
    monkeypatch.chdir(tmp_path)
    assert engine.main(["--notebooks-dir", str(tmp_path), "--profile", "none"]) == 2
    assert "01_bare.py: No kernel name found" in error_line()


# --------------------------------------------------------------------------- kernel shutdown


def test_shutting_a_kernel_down_sends_it_no_sigint() -> None:
    """``jupyter_client`` interrupts a kernel before asking it to shut down; at the end of a
    notebook that SIGINT only makes ipykernel print ``KeyboardInterrupt caught in kernel``."""
    sent = []

    async def run() -> None:
        manager = engine._kernel_manager_class()(kernel_name="python3")
        await manager.start_kernel()
        real = manager._async_signal_kernel

        async def record(signum: int) -> None:
            sent.append(signum)
            await real(signum)

        manager._async_signal_kernel = record
        await manager.interrupt_kernel()  # a running kernel is still interrupted
        await manager.shutdown_kernel()
        assert not await manager.is_alive()

    asyncio.run(run())
    assert sent == [signal.SIGINT]


def test_papermill_warning_about_settings_parameters_is_dropped_and_others_kept() -> None:
    """Papermill reads only the ``parameters`` cell and warns about every key of the
    ``settings`` cell; the plan has checked those keys, so only that warning is dropped."""
    import logging

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("papermill", logging.WARNING, __file__, 0, message, None, None)

    assert not engine._settled_parameters(record("Passed unknown parameter: data_dir"))
    assert engine._settled_parameters(record("Kernel died while waiting for execute reply."))
