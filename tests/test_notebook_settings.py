"""A notebook's run settings (cell tagged ``settings``) and its story's parameters (cell tagged
``parameters``): the runner checks both, papermill's values replace both, and the set-up is one
call (``scale.session.setup``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumo_utils.runner import plan

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
HEADER = "# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n#     name: python3\n# ---\n\n"


def test_each_notebook_declares_its_settings_and_its_story() -> None:
    for nb in plan.read_notebooks(NOTEBOOKS):
        settings = plan.settings_of(nb.node)
        assert {"seed", "strategy", "batch_size", "reports_dir", "models_dir", "cache_dir"} <= set(settings), nb.name
        assert {"epochs", "image_size"} <= set(nb.declared) - set(settings), nb.name
        assert "session.setup(" in nb.path.read_text(encoding="utf-8"), nb.name


def test_injected_values_come_after_both_cells(tmp_path: Path) -> None:
    import papermill

    (tmp_path / "01_x.py").write_text(HEADER + '# %% tags=["settings"]\nseed = 1\n\n'
                                      '# %% tags=["parameters"]\nepochs = 2\n\n# %%\nprint(seed, epochs)\n')
    nb = plan.read_notebooks(tmp_path)[0]
    assert {k: v["default"] for k, v in nb.declared.items()} == {"seed": "1", "epochs": "2"}
    papermill.execute_notebook(nb.node, str(tmp_path / "out.ipynb"), parameters={"seed": 7, "epochs": 3},
                               prepare_only=True, progress_bar=False, kernel_name="python3")
    import nbformat

    cells = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4).cells
    tags = [cell.metadata.get("tags", []) for cell in cells]
    order = [next(i for i, t in enumerate(tags) if tag in t) for tag in ("settings", "parameters", "injected-parameters")]
    assert order == sorted(order)
    assert "seed = 7" in cells[order[2]].source and "epochs = 3" in cells[order[2]].source


def test_a_settings_cell_after_the_parameters_cell_is_refused(tmp_path: Path) -> None:
    (tmp_path / "01_x.py").write_text(HEADER + '# %% tags=["parameters"]\nepochs = 2\n\n'
                                      '# %% tags=["settings"]\nseed = 1\n')
    with pytest.raises(plan.UsageError, match="01_x.py: a cell tagged settings comes after the parameters cell"):
        plan.read_notebooks(tmp_path)


@pytest.mark.slow
def test_setup_finds_the_data_and_prints_its_lines(kermany_root, tmp_path, capsys) -> None:
    from pneumo_utils.scale import session

    run = session.setup(data="kermany", data_dir=kermany_root, external=True, external_dir=None,
                        reports_dir=tmp_path / "r", models_dir="m", seed=3, strategy="default", batch_size=8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"data: {kermany_root}; external validation: ")
    assert lines[1].startswith("default strategy (no distribution): 1 replica")
    assert run.data_dir == Path(kermany_root) and run.reports_dir == tmp_path / "r"
    assert run.models_dir.is_absolute() and run.models_dir.name == "m"
    assert run.batch_size == 8 * run.strategy.num_replicas_in_sync
