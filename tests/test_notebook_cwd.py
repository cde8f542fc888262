"""A notebook runs wherever its kernel starts: in ``notebooks/`` (as JupyterLab starts it) and in
an unrelated folder (plain papermill). Relative output paths mean the project folder, so both
runs write to the same place as ``run_all.sh`` does from the root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_kermany_densenet121.py"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["notebooks", "elsewhere"])
def test_notebook_runs_with_its_kernel_in_any_folder(where, kermany_root, tmp_path):
    import jupytext
    import papermill

    cwd = ROOT / "notebooks" if where == "notebooks" else tmp_path
    out = Path("build") / "cwd-test" / where  # relative: to the project folder, not to cwd
    shutil.rmtree(ROOT / out, ignore_errors=True)
    notebook = tmp_path / "01.ipynb"
    jupytext.write(jupytext.read(NOTEBOOK), notebook)
    papermill.execute_notebook(
        str(notebook), str(tmp_path / "01.out.ipynb"), cwd=str(cwd), kernel_name="python3", progress_bar=False,
        parameters={"data_dir": str(kermany_root), "backbone": "mobilenet_v2", "weights": None, "image_size": 32,
                    "epochs": 1, "max_images_per_class": 4, "n_boot": 20, "cue_images": 8,
                    "reports_dir": f"{out}/reports", "models_dir": f"{out}/models", "cache_dir": f"{out}/cache"},
    )
    assert (ROOT / out / "models" / "01_kermany_densenet121.keras").is_file()
    assert (ROOT / out / "reports" / "01_kermany_densenet121.metrics.json").is_file()
    assert not (cwd / out).exists()
    shutil.rmtree(ROOT / out, ignore_errors=True)
